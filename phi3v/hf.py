"""The one key map between the official HF checkpoint and our modules, and checkpoint file I/O.

Reads and writes the official layout (config.json + single or sharded safetensors with an index)
and assigns tensors strictly; building the model is `Phi3V.from_pretrained`'s job (model.py).

HF leaf names are kept, so the map is a list of prefix renames (both directions). Keys the forward
never uses (the last CLIP block(s) and CLIP post_layernorm) are listed, kept aside in
`model.hf_extras` and written back on export, so a load -> save round trip is lossless.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Phi3VConfig
from .jsonfile import Fields, read_json, show

# (HF prefix, our prefix), most specific first
PREFIXES = [
    ("model.vision_embed_tokens.img_processor.vision_model.", "vision.clip."),
    ("model.vision_embed_tokens.", "vision."),
    ("lm_head.", "lm_head."),
    ("model.", ""),
]
CLIP_HF = PREFIXES[0][0]
# an alias some re-saves contain: the image module's handle on the token embedding
ALIASES = {"model.vision_embed_tokens.wte.weight": "model.embed_tokens.weight"}


def to_ours(hf_key: str) -> str:
    for hf, ours in PREFIXES:
        if hf_key.startswith(hf):
            return ours + hf_key[len(hf):]
    raise KeyError(f"checkpoint key {hf_key!r} is not part of Phi-3.5-vision (no rule in the key map)")


def to_hf(key: str) -> str:
    for hf, ours in PREFIXES:
        if key.startswith(ours):
            return hf + key[len(ours):]
    raise KeyError(key)  # unreachable: the last rule matches everything


def is_unused(cfg: Phi3VConfig, hf_key: str) -> bool:
    """CLIP blocks after the one whose output is used, and CLIP post_layernorm."""
    if not hf_key.startswith(CLIP_HF):
        return False
    rest = hf_key[len(CLIP_HF):]
    if rest.startswith("post_layernorm."):
        return True
    m = re.match(r"encoder\.layers\.(\d+)\.", rest)
    return bool(m) and int(m.group(1)) >= cfg.clip_layers_used


def unused_shapes(cfg: Phi3VConfig) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the unused tensors a checkpoint of this config carries."""
    v = cfg.vision
    d, i = v.hidden_size, v.intermediate_size
    out = {CLIP_HF + "post_layernorm.weight": (d,), CLIP_HF + "post_layernorm.bias": (d,)}
    for j in range(cfg.clip_layers_used, v.num_hidden_layers):
        p = f"{CLIP_HF}encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2"):
            out[p + n + ".weight"], out[p + n + ".bias"] = (d,), (d,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = (d, d), (d,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (i, d), (i,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (d, i), (d,)
    return out


# ------------------------------------------------------------------------------------------------
def local_dir(path_or_hub_id: str | Path, patterns: list[str] | None = None) -> Path:
    """The local directory of a checkpoint: the path itself, or a hub id downloaded (with progress)
    by huggingface_hub."""
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_hub_id)
    if p.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise FileNotFoundError(f"{s!r} is neither a checkpoint directory nor a hub id like "
                                "'microsoft/Phi-3.5-vision-instruct'")
    return hub_snapshot(s, patterns or ["*.json", "*.safetensors"])


def hub_snapshot(hub_id: str, patterns: list[str]) -> Path:
    """The folder of a hub repository's files (those matching `patterns`) in the huggingface_hub
    cache, downloaded when missing. Where that cannot be done (offline and not cached, no such
    repository, a gated one, a failed download) the error names the id and says what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                       OfflineModeIsEnabled, RepositoryNotFoundError)   # .utils: hub 0.23 .. 2.x
    local = "or point --model (the path argument) at a local directory holding its files"
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise FileNotFoundError(f"hub id {hub_id!r} is not in the local Hugging Face cache and {why}: download it "
                                f"first (`hf download {hub_id}`, where there is network) {local}") from None
    except GatedRepoError:
        raise PermissionError(f"hub id {hub_id!r} is a gated repository: accept its terms on huggingface.co and "
                              f"log in (`hf auth login`), {local}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"hub id {hub_id!r}: no such repository on the Hugging Face hub (or a private one: "
                                f"log in with `hf auth login`); check the name, {local}") from None
    except HfHubHTTPError as e:
        msg = " ".join(str(e).split())
        raise OSError(f"hub id {hub_id!r}: download failed ({msg}); retry, {local}") from None
    except HFValidationError as e:
        raise ValueError(f"{hub_id!r} is neither a local directory nor a valid hub id ({e})") from None


def checkpoint_files(d: Path) -> dict[str, Path]:
    """HF key -> safetensors file, from model.safetensors.index.json or a single model.safetensors."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        top = Fields(read_json(index), str(index))
        wm = top.object("weight_map")
        if not wm.obj:
            top.fail("weight_map", "is empty")
        files = {}
        for k, name in wm.obj.items():
            p = PurePosixPath(name) if isinstance(name, str) else None
            if p is None or not name or p.is_absolute() or ".." in p.parts:
                wm.fail(k, f"must name a shard file beside the index, got {show(name)}")
            files[k] = d / name
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which is missing")
        return files
    single = d / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{d} has neither model.safetensors nor model.safetensors.index.json")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: cannot read safetensors file (corrupted or truncated?): {e}") from None


def read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    out = {}
    for f, keys in by_file.items():
        with _open(f) as h:
            present = set(h.keys())
            for k in keys:
                if k not in present:
                    raise ValueError(f"{f}: the index places {k!r} in this shard but it is not there")
                try:
                    out[k] = h.get_tensor(k)
                except Exception as e:
                    raise ValueError(f"{f}: cannot read tensor {k!r} (corrupted or truncated?): {e}") from None
    return out


def load_state(model: torch.nn.Module, hf_tensors: dict[str, torch.Tensor], dtype, device,
               files: dict[str, Path] | None = None) -> None:
    """Strictly assign HF-named tensors to `model`; extras the forward never uses go to hf_extras.

    Every misfit is a ValueError naming the file (`files`: HF key -> safetensors file, as
    `checkpoint_files` returns), the key and what was expected: a key with no rule in the key map or
    that the model lacks, a wrong shape, an integer (or bool, complex) dtype, a missing tensor."""
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = files or {}
    ours, extras = {}, {}
    for hk, t in hf_tensors.items():
        src = files.get(hk, "checkpoint")
        if hk in ALIASES:
            continue
        if not t.is_floating_point():       # every tensor of the model is a float weight
            raise ValueError(f"{src}: tensor {hk!r} has dtype {str(t.dtype).replace('torch.', '')}, expected a "
                             "floating-point weight (float32, bfloat16 or float16)")
        if is_unused(cfg, hk):
            want = unused_shapes(cfg).get(hk)
            if want is None or tuple(t.shape) != want:
                raise ValueError(f"{src}: unexpected tensor {hk!r} with shape {list(t.shape)}"
                                 + (f" (expected {list(want)})" if want else " (the model has no such CLIP tensor)"))
            extras[hk] = t.to(dtype)
            continue
        try:
            k = to_ours(hk)
        except KeyError:
            raise ValueError(f"{src}: tensor {hk!r} is not part of Phi-3.5-vision (no rule in the key map; "
                             f"expected a name starting with one of {[hf for hf, _ in PREFIXES]})") from None
        if k not in expected:
            raise ValueError(f"{src}: unexpected tensor {hk!r} (shape {list(t.shape)}): the model has no {k!r}")
        if tuple(t.shape) != expected[k]:
            raise ValueError(f"{src}: tensor {hk!r} has shape {list(t.shape)}, the model expects "
                             f"{list(expected[k])} (config.json does not match the weights?)")
        ours[k] = t.to(device=device, dtype=dtype)
    missing = [to_hf(k) for k in expected if k not in ours]
    if missing:
        where = sorted({str(Path(f).parent) for f in files.values()}) or ["checkpoint"]
        raise ValueError(f"{', '.join(where)}: checkpoint is missing {len(missing)} tensor(s): "
                         f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    model.load_state_dict(ours, strict=True, assign=True)
    model.hf_extras = extras


# ------------------------------------------------------------------------------------------------
def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under official HF names, plus the unused-but-official extras."""
    sd = {}
    for k, t in model.state_dict().items():
        if ".base_layer." in k or ".lora_" in k or "quant" in k:
            raise ValueError(f"{k!r}: merge LoRA (phi3v.merge_lora) / dequantise before exporting HF weights")
        sd[to_hf(k)] = t
    extras = model.hf_extras or default_extras(model.config, model.dtype)
    sd.update({k: v.to(model.dtype) for k, v in extras.items()})
    return sd


def default_extras(cfg: Phi3VConfig, dtype) -> dict[str, torch.Tensor]:
    """Placeholders for the unused tensors of a model that was never loaded (identity LN, zeros)."""
    return {k: (torch.ones(s) if k.endswith("norm.weight") or re.search(r"layer_norm\d\.weight$", k)
                else torch.zeros(s)).to(dtype) for k, s in unused_shapes(cfg).items()}


def save_pretrained(model, out_dir, max_shard_size: int = 5 * 10 ** 9) -> None:
    """Official layout: config.json, generation_config.json, model.safetensors or shards + index.

    Written into a temporary directory beside out_dir and moved into place file by file, so an
    interrupted save never leaves a half-written shard under the final name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict(model).items()}
    # safetensors refuses tensors sharing storage: give every tensor its own (no shared-tensor crash)
    seen = set()
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            sd[k] = v.clone()
        seen.add(ptr)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if cur and size + n > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    shards.append(cur)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=out))
    try:
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [32007, 32000],
             "pad_token_id": model.config.pad_token_id}, indent=2))
        # remove stale weights from an earlier save with another shard count, then move in
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            if not (tmp / old.name).exists():
                old.unlink()
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
