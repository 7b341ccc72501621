"""Phi-3.5-vision: the Phi-3-mini decoder with LongRoPE and the HD image embedding spliced in.

Matches `Phi3VForCausalLM` of microsoft/Phi-3.5-vision-instruct's remote `modeling_phi3_v.py`
(PHI3V_SPEC §3, §5.7, §8). Shapes: B batch, T tokens (this call), S keys (cache + T), D hidden,
H heads, hd head dim, V vocab.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hf
from .attention import attention
from .config import MAX_INPUT_ID, Phi3VConfig, crop_grids
from .loss import chunked_ce
from .recompute import check_policy, offload_saved, run_block
from .vision import ImageEmbedding, check_image_inputs

STOP_IDS = (32007, 32000)  # <|end|>, <|endoftext|>


class _RMSNormFn(torch.autograd.Function):
    """y = weight * (x * rstd).to(x.dtype), rstd = 1/sqrt(mean(x^2) + eps) in fp32 (the reference's
    order). Saves only x (its dtype) and rstd [..., 1] fp32 for backward, instead of the fp32 copy of
    x and the normalised tensor autograd would keep."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        h = x.to(torch.promote_types(x.dtype, torch.float32))             # fp32 (fp64 stays fp64)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)         # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd                                         # normalised, fp32
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0, dtype=n.dtype).to(weight.dtype)
        g = (grad * weight).to(n.dtype)                                     # d loss / d n
        grad_x = rstd * (g - n * (g * n).mean(-1, keepdim=True))            # through n = x * rstd(x)
        return grad_x.to(x.dtype), grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back to the input dtype *before* the weight multiply (reference order)
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rope_cos_sin(cfg: Phi3VConfig, position_ids: torch.Tensor, long: torch.Tensor | bool, dtype: torch.dtype):
    """LongRoPE tables for positions [B, T] -> cos, sin [B, T, hd] in `dtype`.

    `long` picks the factor set, for the whole call (a bool, the reference) or per token ([B, T] bool,
    packed training). Computed in fp32 exactly as the reference: inv_freq = 1/(ext * theta^(2i/hd)),
    freqs = inv_freq * pos, and both cos and sin scaled by sqrt(1 + ln(max/orig)/ln(orig)).
    """
    dev = position_ids.device
    hd = cfg.head_dim
    # fp32 tables even under a caller's autocast (meta tensors, for memory planning, have no autocast)
    with torch.autocast(device_type=dev.type if dev.type != "meta" else "cpu", enabled=False):
        exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=dev).float() / hd
        base = cfg.rope_theta ** exponent                                          # [hd/2]
        pos = position_ids.float()[..., None]                                      # [B, T, 1]
        short = pos * (1.0 / (torch.tensor(cfg.rope_short_factor, dtype=torch.float32, device=dev) * base))
        if isinstance(long, bool):
            freqs = pos * (1.0 / (torch.tensor(cfg.rope_long_factor, dtype=torch.float32, device=dev) * base)) \
                if long else short
        else:
            lng = pos * (1.0 / (torch.tensor(cfg.rope_long_factor, dtype=torch.float32, device=dev) * base))
            freqs = torch.where(long[..., None], lng, short)                       # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)                                    # [B, T, hd]
        s = cfg.rope_scale
        return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd]; NeoX-style rotate_half over the full head dim."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class KVCache:
    """Preallocated per-layer key/value buffers [B, H, max_len, hd]; `length` keys are valid."""

    def __init__(self, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0      # keys stored by all layers after the last completed call

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s, e = self.length, self.length + k.shape[2]
        if e > self.k[layer].shape[2]:
            raise ValueError(f"KV cache overflow: {e} tokens > capacity {self.k[layer].shape[2]}")
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]


class Attention(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        b, t, d = x.shape
        qkv = self.qkv_proj(x).view(b, t, 3, self.n_heads, self.head_dim)  # q | k | v along the 3*D dim
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # each [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # attention keeps v for backward: a copy of v, so it does not pin the whole qkv output
        v = v.contiguous()
        if cache is not None:
            k, v = cache.update(layer, k, v)                                # [B, H, S, hd]
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))             # [B, T, D]


class MLP(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)   # first half is the gate
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class Phi3VOutput:
    hidden_states: torch.Tensor              # [B, T, D] after the final norm
    logits: torch.Tensor | None = None       # [B, T, V] float32
    loss: torch.Tensor | None = None


class Phi3V(nn.Module):
    """Phi-3.5-vision for causal LM. Module names follow HF's leaf names (hf.py maps the prefixes)."""

    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.vision = ImageEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # how the training forward runs the decoder blocks (configure_training)
        self.recompute, self.compiled, self.offload_activations = "none", False, False
        # checkpoint tensors the forward never uses (last CLIP block, CLIP post-LN), kept for export
        self.hf_extras: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------
    # construction and I/O (the key map and the file formats are hf.py's)
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Phi3V":
        """Load an official-layout checkpoint (local directory or hub id) strictly, in eval mode."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                             f"torch.float16), got {dtype!r}")
        d = hf.local_dir(path_or_hub_id)
        cfg = Phi3VConfig.from_json(d / "config.json")
        files = hf.checkpoint_files(d)
        tensors = hf.read_tensors(files)
        with torch.device("meta"):       # no memory is allocated until the tensors are assigned
            model = cls(cfg)
        hf.load_state(model, tensors, dtype, torch.device(device), files)
        return model.eval()

    def save_pretrained(self, out_dir: str | Path, max_shard_size: int = 5 * 10 ** 9) -> None:
        """Write the official HF layout (config.json, safetensors shards + index), atomically per file."""
        hf.save_pretrained(self, out_dir, max_shard_size=max_shard_size)

    @classmethod
    def from_config(cls, cfg: Phi3VConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> "Phi3V":
        """A randomly initialised model (the demo, tests, benchmarks); deterministic for a seed and device."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        init_weights(model, seed)
        return model.to(dtype)

    def configure_training(self, recompute: str = "full", compile: bool = False,
                           offload_activations: bool = False) -> None:
        """How the training forward runs: the activation recomputation policy of every decoder block and
        CLIP layer ("none", "selective", "full": phi3v.recompute), torch.compile of the decoder
        blocks, CLIP layers and projector (fullgraph, dynamic shapes), and whether what autograd saves
        for backward waits in host memory (`recompute.offload_saved`)."""
        self.recompute, self.compiled = check_policy(recompute), compile
        self.offload_activations = bool(offload_activations)
        self.vision.recompute, self.vision.compiled = self.recompute, compile

    def freeze_vision(self) -> None:
        """Freeze CLIP, separators and projector; the image side then runs without an autograd graph."""
        self.vision.requires_grad_(False)
        self.vision.frozen = True

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ----------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """Token embeddings [B, T, D] with projected image features written at the placeholder ids."""
        is_img = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
        ids = input_ids.clamp(0, self.config.vocab_size - 1)     # a copy: the caller's ids stay negative
        x = self.embed_tokens(ids)
        n_pos = int(is_img.sum())
        if n_pos == 0:
            return x
        if pixel_values is None or image_sizes is None:
            raise ValueError(f"input_ids hold {n_pos} image placeholder positions but pixel_values/image_sizes "
                             "were not given")
        counts = check_image_inputs(self.config, pixel_values, image_sizes)
        if sum(counts) != n_pos:
            raise ValueError(f"input_ids hold {n_pos} image placeholder positions but the {len(counts)} image(s) "
                             f"give {sum(counts)} features ({counts}); each <|image_k|> run must have exactly "
                             "the processor's token count, and images must be in placeholder order")
        feats = self.vision(pixel_values.to(self.device), crop_grids(image_sizes))      # [n_pos, D]
        # k-th placeholder in row-major order gets the k-th feature row (the ids' values are ignored)
        return x.index_put(torch.nonzero(is_img, as_tuple=True), feats.to(x.dtype))

    def decoder(self, x: torch.Tensor, position_ids: torch.Tensor, long, mask, cache: KVCache | None = None):
        cos, sin = rope_cos_sin(self.config, position_ids, long, x.dtype)
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, cos, sin, mask, cache, i)
            else:   # recomputation / compilation as configured (plain eager without grad by default)
                x = run_block(block, self.recompute, self.compiled, x, cos, sin, mask)
        return self.norm(x)

    def check_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, labels=None,
                     position_ids=None, past: int = 0) -> None:
        """Validate the public API's tensor arguments (forward / hidden / generate): ValueError naming
        the argument and what is wrong. Not used by the training path (its inputs come from
        data.collate, checked on the CPU)."""
        v = self.config.vocab_size
        if not _is_int_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {_describe(input_ids)}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids is empty (shape [{b}, {t}]): every row needs at least one token")
        if not input_ids.is_meta:
            lo, hi = input_ids.min().item(), input_ids.max().item()
            if hi >= v:
                raise ValueError(f"input_ids holds token id {hi}, but the vocabulary has {v} ids (0..{v - 1})")
            if lo <= -MAX_INPUT_ID:
                raise ValueError(f"input_ids holds {lo}: negative ids are image placeholders in "
                                 f"(-{MAX_INPUT_ID}, 0), anything lower is neither a token nor an image")
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(f"attention_mask must be a tensor [B, cache+T] = [{b}, {past + t}], got "
                                 f"{_describe(attention_mask)}")
            if not attention_mask.is_meta and not ((attention_mask == 0) | (attention_mask == 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if labels is not None:
            if not _is_int_tensor(labels) or tuple(labels.shape) != (b, t):
                raise ValueError(f"labels must be an integer tensor shaped like input_ids [{b}, {t}], got "
                                 f"{_describe(labels)}")
            bad = (labels != -100) & ((labels < 0) | (labels >= v))
            if not labels.is_meta and bad.any():
                raise ValueError(f"labels hold {labels[bad][0].item()}: each label must be a token id in "
                                 f"0..{v - 1} or -100 (ignored)")
        if position_ids is not None and (not _is_int_tensor(position_ids) or tuple(position_ids.shape) != (b, t)):
            raise ValueError(f"position_ids must be an integer tensor [{b}, {t}], got {_describe(position_ids)}")
        if (pixel_values is None) != (image_sizes is None):
            raise ValueError("pixel_values and image_sizes go together: give both or neither")
        if pixel_values is not None:
            if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
                raise ValueError(f"pixel_values must be a float tensor, got {_describe(pixel_values)}")
            if not _is_int_tensor(image_sizes):
                raise ValueError(f"image_sizes must be an integer tensor [n_images, 2], got {_describe(image_sizes)}")

    def hidden(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
               position_ids=None, cache: KVCache | None = None) -> torch.Tensor:
        """The reference forward up to the final norm: hidden states [B, T, D].

        The LongRoPE factor set is chosen for the whole call from the total key length (cache + T),
        as the reference's eager attention does. Without position_ids positions are arange from the
        cache length for every row (also with left padding, like the reference).
        """
        self.check_inputs(input_ids, attention_mask, pixel_values, image_sizes, position_ids=position_ids,
                          past=cache.length if cache is not None else 0)
        return self._hidden(input_ids, attention_mask, pixel_values, image_sizes, position_ids, cache)

    def _hidden(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                position_ids=None, cache: KVCache | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids, pixel_values, image_sizes)
        s = past + t
        long = s > self.config.original_max_position_embeddings
        if attention_mask is not None and not bool(attention_mask.all()):
            # additive mask with finfo.min (as the reference): fully masked rows stay finite
            keep = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(past)[None] & attention_mask.bool()[:, None]
            mask = torch.zeros(b, 1, t, s, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~keep[:, None], torch.finfo(x.dtype).min)
        elif past == 0:
            mask = "causal" if t > 1 else None
        else:
            mask = None if t == 1 else torch.ones(t, s, dtype=torch.bool, device=x.device).tril(past)
        h = self.decoder(x, position_ids, long, mask, cache)
        if cache is not None:
            cache.length = s
        return h

    def hidden_packed(self, batch: dict) -> torch.Tensor:
        """Training forward on padded or packed rows -> hidden states [B, T, D], without host syncs.

        `batch` holds the tensors `data.training_inputs` prepared on the CPU (on this model's device)
        plus pixel_values: tokens attend causally within their own document only, positions restart at
        0 in every document, and each document picks short/long LongRoPE factors from its own length,
        so a sample gives the same result packed, padded or alone.
        """
        ids = batch["input_ids"]
        x = self.embed_tokens(ids.clamp(0, self.config.vocab_size - 1))            # [B, T, D]
        if batch.get("image_index") is not None:
            feats = self.vision(batch["pixel_values"], batch["crops"])              # [n_img_tokens, D]
            # image features replace the placeholders, in row-major placeholder order
            rows, cols = batch["image_index"]
            x = x.index_put((rows, cols), feats.to(x.dtype))
        long = batch["doc_lens"] > self.config.original_max_position_embeddings    # [B, T]
        if batch["causal"]:
            mask = "causal"          # one sample per row (+ padding nobody attends to): flash kernels
        else:
            doc = batch["doc_ids"]
            same = doc[:, :, None] == doc[:, None, :]
            mask = (same & torch.ones_like(same[0]).tril())[:, None]        # [B, 1, T, T] block-causal
        return self.decoder(x, batch["position_ids"], long, mask)

    def training_loss(self, batch: dict) -> torch.Tensor:
        """Summed cross-entropy of the supervised tokens of a collated micro-batch (`data.collate`,
        moved to this model's device): the training step's forward, without host syncs."""
        with offload_saved(self) if self.offload_activations else contextlib.nullcontext():
            return chunked_ce(self.hidden_packed(batch), self.lm_head, batch["target_index"], batch["targets"])

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, labels=None,
                position_ids=None) -> Phi3VOutput:
        """Reference-compatible forward: hidden states, float32 logits, and the shifted mean CE loss."""
        self.check_inputs(input_ids, attention_mask, pixel_values, image_sizes, labels, position_ids)
        h = self._hidden(input_ids, attention_mask, pixel_values, image_sizes, position_ids)
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device, torch.long), ignore_index=-100)
        return Phi3VOutput(hidden_states=h, logits=logits, loss=loss)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, stop_ids=STOP_IDS, generator: torch.Generator | None = None) -> torch.Tensor:
        """KV-cached decoding; returns only the new ids [B, n_new] (rows that stopped are padded).

        Batched prompts must be left-padded; with a mask, positions are cumsum(mask) - 1 (1 at padding).
        Images are encoded at prefill only. When the sequence crosses original_max_position_embeddings
        the cache is dropped once and everything is re-run with the long factors (Phi-3.5's rule).
        """
        self.check_inputs(input_ids, attention_mask, pixel_values, image_sizes)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0 for sampling, got {temperature!r}")
        if do_sample and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if attention_mask is not None:
            if not (attention_mask[:, 1:] >= attention_mask[:, :-1]).all():
                raise ValueError("generate needs left-padded prompts: attention_mask has a 0 after a 1 in a row")
            if not attention_mask[:, -1].bool().all():
                raise ValueError("attention_mask has a row without tokens (an empty prompt)")
        b, t0 = input_ids.shape
        dev = self.device
        ids = input_ids.to(dev)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(dev).long()
        pad = self.config.pad_token_id
        orig = self.config.original_max_position_embeddings
        cache = KVCache(len(self.layers), b, self.config.num_attention_heads, t0 + max_new_tokens,
                        self.config.head_dim, self.dtype, dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        out = []
        for _ in range(max_new_tokens):
            total = ids.shape[1]
            if 0 < cache.length <= orig < total:
                cache.length = 0     # crossing into the long regime: recompute with long factors
            new = ids[:, cache.length:]
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, cache.length:]
            h = self._hidden(new, mask if not bool(mask.all()) else None,
                             pixel_values if cache.length == 0 else None,
                             image_sizes if cache.length == 0 else None, pos, cache)
            logits = self.lm_head(h[:, -1]).float()                       # [B, V]
            if do_sample:
                nxt = sample_top_p(logits / temperature, top_p, generator)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, torch.tensor(list(stop_ids), device=dev))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(out, dim=1) if out else ids.new_zeros(b, 0)


def _is_int_tensor(x) -> bool:
    return torch.is_tensor(x) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def sample_top_p(logits: torch.Tensor, top_p: float, generator=None) -> torch.Tensor:
    """Nucleus sampling over logits [B, V] -> ids [B]."""
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p          # keep the smallest prefix with mass >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random init for a model built from a config (demo, tests, benchmarks).

    Drawn with a generator on the model's device (fast for 4B parameters on a GPU; a CPU model gets
    the same values on every machine). Scaled so every block changes the output (not the
    near-uniform attention of a flat 0.02 init).
    """
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
        if name.endswith("norm.weight") or re.search(r"(layer_norm\d|layrnorm)\.weight$", name):
            p.copy_(1 + 0.02 * r)
        elif name.endswith("bias"):
            p.copy_(0.02 * r)
        elif p.dim() >= 2 and "embed" not in name:
            p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
        else:  # embeddings, separators, class embedding
            p.copy_(0.5 * r)
