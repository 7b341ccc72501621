"""LoRA as a post-load module swap, and peft-format adapters (STYLE practice 5).

`apply_lora` replaces each targeted `nn.Linear` (or `NF4Linear`, for QLoRA) by a `LoRALinear` that
wraps it as `base_layer` (peft's attribute name) and adds `scaling * B(A(dropout(x)))`, as peft's
`lora.Linear` does. Our module names are HF's minus prefixes (hf.py), so a peft adapter is our
LoRA state dict with the prefixes renamed: `base_model.model.` + HF module name + `.lora_A.weight`.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import LM_LINEARS
from .hf import is_unused, to_hf, to_ours
from .jsonfile import Fields, read_json, show, write_atomic, write_text_atomic
from .nf4 import NF4Linear

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


# https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py (class Linear)
class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), base frozen, adapter in float32."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise ValueError(f"LoRA wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.init, self.use_rslora = rank, alpha, init, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = (base_layer.quant_packed if isinstance(base_layer, NF4Linear) else base_layer.weight).device
        # float32 whatever the base dtype: tiny, and updates are not lost to bf16 rounding
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.merged = False
        self.reset_parameters()

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """peft's init: A Kaiming-uniform(a=sqrt 5) (nn.Linear's default) or N(0, 1/r^2); B = 0."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
        nn.init.zeros_(self.lora_B.weight)

    # peft's tuner layers expose the base weight too; the image projector reads `.weight.dtype`
    @property
    def weight(self) -> torch.Tensor:
        if isinstance(self.base_layer, NF4Linear):
            raise AttributeError("the base layer is NF4-quantised and has no float weight "
                                 "(use .base_layer.dequantize())")
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, [out, in] (peft's get_delta_weight, same op order)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight in place (faster eval); unmerge() undoes it.

        The sum is formed in float32 and rounded once to the base dtype; with a bf16 base,
        unmerge restores the weight only up to that rounding.
        """
        if self.merged:
            return
        if isinstance(self.base_layer, NF4Linear):
            raise ValueError("cannot merge into an NF4 base in place; merge_lora(model) dequantises and merges")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        h = F.linear(self.dropout(x), a)                                    # [..., rank]
        # y + scaling * (h @ B^T) as one GEMM into y's values (addmm): no separate [..., out] LoRA
        # output or scaled copy, which counts for gate_up_proj's 16384-wide output
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ------------------------------------------------------------------------------------------------
def _hf_name(name: str) -> str:
    """HF module name of one of our module names (to_hf maps keys, so go through a dummy key)."""
    return to_hf(name + ".weight")[: -len(".weight")]


def _target_hit(name: str, targets) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list matches a name that
    equals an entry or ends with `.` + entry. We try both our name and the HF name."""
    names = (name, _hf_name(name))
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith("." + t) for n in names for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _find_targets(model: nn.Module, targets, layers_only: bool) -> dict[str, nn.Module]:
    """Modules matched by `targets` ({name: module}); errors for a target that matches nothing or a
    module that is not a Linear."""
    found, used = {}, set()
    for name, mod in model.named_modules():
        if not name or (layers_only and not name.startswith("layers.")):
            continue
        if name.endswith(".base_layer") or ".lora_" in name:
            continue  # the inside of an existing LoRALinear
        if not _target_hit(name, targets):
            continue
        if not isinstance(mod, (nn.Linear, NF4Linear, LoRALinear)):
            raise ValueError(f"LoRA target matches {name!r}, a {type(mod).__name__}; only Linear layers can "
                             "carry LoRA")
        found[name] = mod
        if not isinstance(targets, str):
            used.update(t for t in targets if name == t or name.endswith("." + t)
                        or _hf_name(name) == t or _hf_name(name).endswith("." + t))
    if isinstance(targets, str):
        if not found:
            raise ValueError(f"LoRA target pattern {targets!r} matches no module of the model")
    else:
        missing = [t for t in targets if t not in used]
        if missing:
            raise ValueError(f"LoRA target(s) {missing} match no module of the model")
    return found


def _freeze_all_but_lora(model: nn.Module) -> None:
    model.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def apply_lora(model: nn.Module, rank: int = 64, alpha: float = 128, dropout: float = 0.0, targets=None,
               init: str = "kaiming") -> nn.Module:
    """Wrap the targeted Linears in LoRALinear in place and freeze everything else; returns model.

    Default targets: the language model's qkv_proj, o_proj, gate_up_proj, down_proj (under
    `layers.`). `targets` may be a list of names (matched like peft: equal, or a `.`-suffix, against
    our or the HF module name; e.g. "lm_head", "q_proj", "fc1", "img_projection.0") or a regex
    string that must match a whole name. Call quantize_nf4 first for QLoRA.
    """
    default = targets is None
    if default:
        targets = list(LM_LINEARS)
    elif not isinstance(targets, str):
        if not isinstance(targets, (list, tuple, set, frozenset)) or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"apply_lora: targets must be a regex string or a list of module names, got {targets!r}")
        targets = list(targets)
        if not targets:
            raise ValueError("apply_lora: empty targets")
    found = _find_targets(model, targets, layers_only=default)
    for name, mod in found.items():
        if isinstance(mod, LoRALinear):
            raise ValueError(f"{name!r} already has LoRA (apply_lora/load_adapter was called before)")
    for name, mod in found.items():
        lora = LoRALinear(mod, rank, alpha, dropout, init)
        lora.train(mod.training)     # a new module defaults to train mode: follow the model's mode
        _set_module(model, name, lora)
    _freeze_all_but_lora(model)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under our names, e.g. `layers.0.self_attn.qkv_proj.lora_A.weight`."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A.weight"] = m.lora_A.weight
        sd[f"{name}.lora_B.weight"] = m.lora_B.weight
    return sd


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, in module order (what the optimizer gets)."""
    return list(lora_state_dict(model).values())


# ------------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place.

    `scaling * B @ A` is added in float32 and rounded once to the base dtype. An NF4 base is first
    dequantised to the model dtype, so the merged model is an ordinary one that
    `save_pretrained` exports under the official HF names.
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("merge_lora: the model has no LoRA modules")
    model_dtype = getattr(model, "dtype", None)
    for name, m in mods.items():
        if isinstance(m.base_layer, NF4Linear):
            dtype = model_dtype if isinstance(model_dtype, torch.dtype) else m.base_layer.compute_dtype
            base = m.base_layer.to_linear(dtype)
            m.base_layer, m.merged = base, False
        m.merge()
        m.base_layer.train(m.training)
        _set_module(model, name, m.base_layer)
    return model


# ------------------------------------------------------------------------------------------------
def _peft_targets(model: nn.Module, lora_names: list[str]) -> list[str]:
    """Shortest HF-name suffixes that select exactly these modules among the model's linears
    under peft's list rule (e.g. "qkv_proj", "img_projection.0"), so peft rebuilds the same set."""
    linears = [_hf_name(n) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and not n.endswith(".base_layer")
               and ".lora_" not in n]
    chosen = set(_hf_name(n) for n in lora_names)
    out = set()
    for hf in sorted(chosen):
        parts = hf.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if s.isdigit():
                continue   # "0" alone would match every numbered child
            if all(x in chosen for x in linears if x == s or x.endswith("." + s)):
                out.add(s)
                break
    return sorted(out)


def save_adapter(model: nn.Module, adapter_dir, base_model_name_or_path: str | None = None) -> None:
    """Write the adapter in peft's format: adapter_config.json + adapter_model.safetensors.

    Keys are `base_model.model.<HF module name>.lora_{A,B}.weight`, and the config carries exactly
    the fields peft 0.11 writes (later versions fill in their new fields with defaults), so
    `PeftModel.from_pretrained(hf_model, adapter_dir)` loads it. Each file is written to a
    temporary name and renamed.
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA modules (apply_lora or load_adapter first)")
    first = next(iter(mods.values()))
    for name, m in mods.items():
        if (m.rank, m.alpha, m.dropout_p, m.use_rslora) != (first.rank, first.alpha, first.dropout_p, first.use_rslora):
            raise ValueError(f"save_adapter: {name!r} has rank/alpha/dropout ({m.rank}, {m.alpha}, {m.dropout_p}) "
                             f"unlike the others ({first.rank}, {first.alpha}, {first.dropout_p}); one adapter "
                             "config cannot describe both")
        if m.merged:
            raise ValueError(f"save_adapter: {name!r} is merged; unmerge() it first")
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "name_or_path", "") or None
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True if first.init == "kaiming" else "gaussian",
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": first.alpha, "lora_dropout": first.dropout_p, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": first.rank,
        "rank_pattern": {}, "revision": None, "target_modules": _peft_targets(model, list(mods)),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": first.use_rslora,
    }
    tensors = {PEFT_PREFIX + to_hf(k): v.detach().to("cpu").contiguous()
               for k, v in lora_state_dict(model).items()}
    out = Path(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_text_atomic(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
def _read_config(d: Path) -> dict:
    """adapter_config.json, validated: {"r", "lora_alpha", "lora_dropout", "use_rslora", "init",
    "target_modules", "base_model_name_or_path"}. Errors name the file and the field."""
    path = d / CONFIG_NAME
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{d} has no {CONFIG_NAME} (not a peft adapter directory)")
    f = Fields(read_json(path), str(path))
    if f.string("peft_type", "LORA", null=True) != "LORA":
        f.fail("peft_type", f"= {f.value('peft_type')!r}; only LORA adapters are supported")
    # options that change the maths or the module set, which we do not implement
    unsupported = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
                   "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "lora_bias": False,
                   "target_parameters": None, "trainable_token_indices": None}
    for key, ok in unsupported.items():
        v = f.value(key, ok)
        if v != ok and (v or ok):      # null / [] / {} / false all mean "off"
            f.fail(key, f"= {show(v)} is not supported (only plain LoRA: {key}={show(ok)})")
    # PiSSA, OLoRA, LoftQ, ... initialisations rewrite the base weights: the adapter alone is not enough
    init = f.value("init_lora_weights", True, null=True)
    if init not in (True, False, "gaussian"):
        f.fail("init_lora_weights", f"= {show(init)}: such adapters need the base weights that initialisation "
               "modified; convert it to a plain LoRA adapter with peft first")
    targets = f.value("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            f.fail("target_modules", f"is not a valid regular expression ({e}): {targets!r}")
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        f.fail("target_modules", f"must be a regular expression or a non-empty list of module names, got "
               f"{show(targets)}")
    return {"r": f.int("r"), "lora_alpha": f.number("lora_alpha", above=0),
            "lora_dropout": f.number("lora_dropout", 0.0, min=0, below=1, null=True),
            "use_rslora": f.boolean("use_rslora", False, null=True),
            "init": "gaussian" if init == "gaussian" else "kaiming", "target_modules": targets,
            "base_model_name_or_path": f.string("base_model_name_or_path", None, null=True)}


def _read_tensors(d: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weights file, {key: tensor}) of an adapter directory; ValueError naming the file if it is
    unreadable or not a mapping of names to tensors."""
    st, pt = d / WEIGHTS_NAME, d / "adapter_model.bin"
    if st.exists():
        try:
            return st, load_file(str(st))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{st}: cannot read safetensors file ({e})") from None
    if pt.exists():
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for corrupt files
            raise ValueError(f"{pt}: cannot read ({e})") from None
        if not isinstance(tensors, dict):
            raise ValueError(f"{pt}: expected a state dict (names -> tensors), got {type(tensors).__name__}")
        for key, t in tensors.items():
            if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"{pt}: entry {key!r} is a {type(t).__name__}, expected a tensor under a string name")
        return pt, tensors
    raise FileNotFoundError(f"{d} has neither {WEIGHTS_NAME} nor adapter_model.bin")


def _adapter_modules(model: nn.Module, tensors: dict[str, torch.Tensor],
                     path: Path) -> tuple[dict[str, dict], int]:
    """{our module name: {"A": tensor, "B": tensor}} from peft keys, and how many tensors belonged
    to CLIP blocks the model never runs (skipped). Errors name the weights file `path` and the key."""
    out, keys, skipped = {}, {}, 0
    cfg = getattr(model, "config", None)
    for key, t in tensors.items():
        hk = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", hk)   # also `.lora_A.default.weight`
        if m is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA A/B weight (bias, embedding or "
                             "modules_to_save adapters are not supported)")
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}, expected a "
                             "floating-point LoRA weight (float32, bfloat16 or float16)")
        if t.dim() != 2:
            raise ValueError(f"{path}: tensor {key!r} has shape {list(t.shape)}, expected a 2-D LoRA weight matrix")
        hf_mod, which = m.groups()
        if cfg is not None and is_unused(cfg, hf_mod + ".weight"):
            skipped += 1     # peft without the recipe's CLIP patch also wraps the unused last block
            continue
        try:
            name = to_ours(hf_mod + ".weight")[: -len(".weight")]
        except KeyError:
            raise ValueError(f"{path}: tensor {key!r}: module {hf_mod!r} is not part of this model") from None
        if which in out.setdefault(name, {}):
            raise ValueError(f"{path}: tensors {keys[name, which]!r} and {key!r} are both lora_{which} of module "
                             f"{hf_mod!r}; keep one")
        out[name][which], keys[name, which] = t, key
    return out, skipped


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Load a peft LoRA adapter in place onto a model without LoRA (building the modules); returns model.

    Everything is checked before the model is touched: targets that match nothing, tensors for
    modules the model lacks or the config does not target, targeted modules without tensors,
    ranks and shapes. Any misfit is a ValueError naming the module. A differing
    base_model_name_or_path only warns (checkpoints move). Keys may be peft's
    (`base_model.model.…lora_A.weight`, also `…lora_A.default.weight`) or transformers' (no prefix).
    """
    if lora_modules(model):
        raise ValueError("load_adapter: the model already has LoRA modules; load the adapter onto a model "
                         "without LoRA (e.g. straight from Phi3V.from_pretrained)")
    d = Path(adapter_dir)
    cfg = _read_config(d)
    r, alpha, dropout, rslora = cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]
    init, targets = cfg["init"], cfg["target_modules"]

    base = cfg["base_model_name_or_path"]
    ours = getattr(getattr(model, "config", None), "name_or_path", "")
    # compare the last path component: a hub id and its local snapshot/copy share it
    if base and ours and Path(str(base).rstrip("/")).name != Path(str(ours).rstrip("/")).name:
        warnings.warn(f"adapter {d} was trained on {base!r}, loading it onto {ours!r}", stacklevel=2)

    found = _find_targets(model, targets, layers_only=False)
    path, tensors = _read_tensors(d)
    adapter, skipped = _adapter_modules(model, tensors, path)
    for name, ab in adapter.items():
        if name not in found:
            if name in dict(model.named_modules()):
                raise ValueError(f"{path}: tensors for module {_hf_name(name)!r}, which target_modules="
                                 f"{targets} does not select")
            raise ValueError(f"{path}: tensors for module {_hf_name(name)!r}, which the model does not have")
        for which in "AB":
            if which not in ab:
                raise ValueError(f"{path}: no lora_{which} for module {_hf_name(name)!r}")
        mod = found[name]
        want_a, want_b = (r, mod.in_features), (mod.out_features, r)
        got_a, got_b = tuple(ab["A"].shape), tuple(ab["B"].shape)
        if got_a[:1] != (r,) or got_b[1:] != (r,):
            raise ValueError(f"{path}: module {_hf_name(name)!r}: adapter tensors have rank {got_a[0]}/{got_b[-1]} "
                             f"but adapter_config.json says r={r}")
        if got_a != want_a or got_b != want_b:
            raise ValueError(f"{path}: module {_hf_name(name)!r}: lora_A {list(got_a)} / lora_B {list(got_b)} do not "
                             f"fit the layer (expected {list(want_a)} / {list(want_b)})")
    missing = [n for n in found if n not in adapter]
    if missing:
        raise ValueError(f"{path}: no tensors for targeted module(s) {[_hf_name(n) for n in missing[:8]]}")
    if skipped:
        warnings.warn(f"{d}: skipped {skipped} tensor(s) of CLIP layers this model never runs", stacklevel=2)

    for name, mod in found.items():
        lora = LoRALinear(mod, r, alpha, dropout, init, use_rslora=rslora)
        lora.train(mod.training)
        _set_module(model, name, lora)
        with torch.no_grad():
            lora.lora_A.weight.copy_(adapter[name]["A"])
            lora.lora_B.weight.copy_(adapter[name]["B"])
    _freeze_all_but_lora(model)
    return model
