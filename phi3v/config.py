"""Phi3VConfig: the frozen configuration of Phi-3.5-vision, built strictly from config.json.

Matches `configuration_phi3_v.Phi3VConfig` of the reference remote code (PHI3V_SPEC §1). Only the
variant that Phi-3.5-vision ships is implemented; any other value raises instead of being ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .jsonfile import Fields, read_json

CLIP_NAME = "openai/clip-vit-large-patch14-336"

# Leaf names of the Linear layers, by part of the model (HF's names; the one home of these lists).
LM_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")          # every decoder block
CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")   # every CLIP block
PROJECTOR_LINEARS = ("img_projection.0", "img_projection.2")               # the image projector MLP
CROP = 336   # CLIP input size: HD images are tiled into CROP x CROP crops
MAX_INPUT_ID = int(1e9)   # image placeholders are input ids in (-1e9, 0), as the reference's


def crop_grids(image_sizes) -> list[tuple[int, int]]:
    """(rows, cols) of sub-crops of each image, from image_sizes [n, 2] (padded height, width in pixels)."""
    return [(int(h) // CROP, int(w) // CROP) for h, w in image_sizes.tolist()]


def crop_grid_tokens(h_crops: int, w_crops: int, g: int = 12) -> int:
    """Image tokens of one image of h x w crops (PHI3V_SPEC §5.8), the one home of the formula.

    The stitched sub-crop grid (h*g rows of w*g tokens) with a separator after every row, glb_GN,
    then the global crop's g x g grid with a separator after every row; g = merged tokens per crop
    side (24 CLIP patches merged 2x2 -> 12).
    """
    return h_crops * g * (w_crops * g + 1) + 1 + g * (g + 1)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT-L/14-336 sizes (hard-coded in the reference; the tiny checkpoints override them)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:  # patches per crop side (24)
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class Phi3VConfig:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    rope_short_factor: tuple[float, ...] = (1.0,) * 48
    rope_long_factor: tuple[float, ...] = (1.0,) * 48
    bos_token_id: int = 1
    pad_token_id: int = 32000
    # the image side
    image_dim_out: int = 1024          # CLIP width fed to the 2x2 merge
    num_img_tokens: int = 144          # merged tokens per crop (12x12)
    clip_layer_idx: int = -2           # hidden_states[-2] = output of the second-to-last block
    vision: VisionConfig = field(default_factory=VisionConfig)
    name_or_path: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_scale(self) -> float:
        """sqrt(1 + ln(max/orig)/ln(orig)), applied to cos and sin in both regimes (PHI3V_SPEC §3.6)."""
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    @property
    def clip_layers_used(self) -> int:
        """How many CLIP blocks run: hidden_states has num_layers+1 entries, we stop at clip_layer_idx."""
        n = self.vision.num_hidden_layers
        return (n + 1 + self.clip_layer_idx) if self.clip_layer_idx < 0 else self.clip_layer_idx

    @classmethod
    def from_dict(cls, d: dict, name_or_path: str = "", source: str | None = None) -> "Phi3VConfig":
        """Validate a config.json dict and build the config. Wrong types, sizes out of range and
        unsupported variants raise ValueError naming the file (`source`) and the field."""
        f = Fields(d, source or (f"config.json of {name_or_path!r}" if name_or_path else "config.json"))

        mt = d.get("model_type")
        if mt != "phi3_v":
            f.fail("model_type", f"= {mt!r}; only 'phi3_v' (Phi-3/3.5-vision) is supported")
        hidden, heads = f.int("hidden_size", 3072), f.int("num_attention_heads", 32)
        if hidden % heads or (hidden // heads) % 2:
            f.fail("hidden_size", f"{hidden} must be num_attention_heads ({heads}) x an even head size")
        kv = f.int("num_key_value_heads", heads, null=True)
        if kv != heads:
            f.fail("num_key_value_heads", f"= {kv} != num_attention_heads={heads}: grouped-query attention is "
                   "not part of Phi-3.5-vision and is not implemented")
        if f.string("hidden_act", "silu") != "silu":
            f.fail("hidden_act", f"= {d['hidden_act']!r} is not supported (only 'silu')")
        if f.boolean("tie_word_embeddings", False, null=True):
            f.fail("tie_word_embeddings", "= true is not supported (Phi-3.5-vision stores lm_head separately)")
        for k in ("attention_dropout", "embd_pdrop", "resid_pdrop"):
            if f.number(k, 0.0, null=True) != 0.0:
                f.fail(k, f"= {d[k]} is not supported (only 0.0, as in Phi-3.5-vision)")
        orig = f.int("original_max_position_embeddings", 4096, min=2)
        sizes = {k: f.int(k, default) for k, default in (
            ("vocab_size", 32064), ("intermediate_size", 8192), ("num_hidden_layers", 32),
            ("max_position_embeddings", orig))}

        # LongRoPE ("su" in the remote code, "longrope" in newer transformers)
        half = hidden // heads // 2
        rs = f.object("rope_scaling", None, null=True)
        if rs is None:
            short = long = (1.0,) * half   # plain RoPE: both factor sets are 1
        else:
            kind = rs.value("type", rs.value("rope_type", None))
            if kind not in ("su", "longrope"):
                rs.fail("type", f"= {kind!r} is not supported (only 'su'/'longrope')")
            short, long = rs.numbers("short_factor", above=0), rs.numbers("long_factor", above=0)
            if len(short) != half or len(long) != half:
                rs.fail("short_factor", f"and long_factor must have head_dim/2 = {half} entries, got "
                        f"{len(short)} short and {len(long)} long")

        embd = f.object("embd_layer")
        expect = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                  "use_hd_transform": True, "with_learnable_separator": True}
        for k, v in expect.items():
            if embd.value(k, v) != v:
                embd.fail(k, f"= {embd.value(k)!r} is not supported (only {v!r})")
        ip = f.object("img_processor")
        if ip.string("model_name", CLIP_NAME) != CLIP_NAME:
            ip.fail("model_name", f"= {ip.value('model_name')!r} is not supported (only {CLIP_NAME!r})")
        if ip.string("type_feature", "patch") != "patch":
            ip.fail("type_feature", f"= {ip.value('type_feature')!r} is not supported (only 'patch')")
        layer_idx = ip.int("layer_idx", -2, min=None)

        vc = f.object("vision_config", None, null=True)
        if vc is None:
            vision = VisionConfig()
        else:
            if vc.string("hidden_act", "quick_gelu") != "quick_gelu":
                vc.fail("hidden_act", f"= {vc.value('hidden_act')!r} is not supported (only 'quick_gelu')")
            vision = VisionConfig(**{k: vc.int(k, getattr(VisionConfig, k)) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size")}, layer_norm_eps=vc.number("layer_norm_eps", 1e-5, above=0))
            if vision.hidden_size % vision.num_attention_heads:
                vc.fail("hidden_size", f"{vision.hidden_size} is not divisible by num_attention_heads "
                        f"{vision.num_attention_heads}")
        if vision.image_size != 336 or vision.grid % 2 or vision.image_size % vision.patch_size:
            f.fail("vision_config.image_size", f"{vision.image_size} / patch_size {vision.patch_size} must give "
                   "336 px crops with an even patch grid")
        dim_out = ip.int("image_dim_out", vision.hidden_size)
        if dim_out != vision.hidden_size:
            ip.fail("image_dim_out", f"= {dim_out} differs from the CLIP width {vision.hidden_size}")
        used = vision.num_hidden_layers + 1 + layer_idx if layer_idx < 0 else layer_idx
        if not 1 <= used <= vision.num_hidden_layers:
            ip.fail("layer_idx", f"= {layer_idx} is out of range for {vision.num_hidden_layers} CLIP layers")

        return cls(
            hidden_size=hidden, num_attention_heads=heads, **sizes,
            rms_norm_eps=f.number("rms_norm_eps", 1e-5, above=0),
            rope_theta=float(f.number("rope_theta", 10000.0, above=0)), original_max_position_embeddings=orig,
            rope_short_factor=short, rope_long_factor=long,
            bos_token_id=f.int("bos_token_id", 1, min=0, null=True),
            pad_token_id=f.int("pad_token_id", 32000, min=0, null=True),
            image_dim_out=dim_out, num_img_tokens=ip.int("num_img_tokens", 144), clip_layer_idx=layer_idx,
            vision=vision, name_or_path=name_or_path or f.string("_name_or_path", "", null=True))

    @classmethod
    def from_json(cls, path: str | Path) -> "Phi3VConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(read_json(path), name_or_path=str(path.parent), source=str(path))

    def to_dict(self) -> dict:
        """The official config.json layout (what save_pretrained writes)."""
        d = {
            "_name_or_path": self.name_or_path or "phi3v", "architectures": ["Phi3VForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                         "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
            "model_type": "phi3_v", "attention_dropout": 0.0, "bos_token_id": self.bos_token_id,
            "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True},
            "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "img_processor": {"image_dim_out": self.image_dim_out, "model_name": CLIP_NAME,
                              "name": "clip_vision_model", "num_img_tokens": self.num_img_tokens},
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads, "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_attention_heads,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "pad_token_id": self.pad_token_id, "resid_pdrop": 0.0, "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {"long_factor": list(self.rope_long_factor),
                             "short_factor": list(self.rope_short_factor), "type": "su"},
            "rope_theta": self.rope_theta, "sliding_window": 262144, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.38.1", "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.clip_layer_idx != -2:
            d["img_processor"]["layer_idx"] = self.clip_layer_idx
        if self.vision != VisionConfig():
            v = self.vision
            d["vision_config"] = {
                "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": v.hidden_size,
                "image_size": v.image_size, "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.layer_norm_eps, "num_attention_heads": v.num_attention_heads,
                "num_channels": 3, "num_hidden_layers": v.num_hidden_layers, "patch_size": v.patch_size,
                "projection_dim": 768}
        return d

    @classmethod
    def tiny(cls, **overrides) -> "Phi3VConfig":
        """A small config with the real architecture (for tests, the demo and benchmarks on CPU)."""
        base = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=8192, original_max_position_embeddings=256,
                   rope_short_factor=(1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5),
                   rope_long_factor=(1.2, 1.5, 1.9, 2.4, 3.0, 3.6, 4.2, 4.8), image_dim_out=32,
                   vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2))
        return replace(base, **overrides)
