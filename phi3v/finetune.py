"""The fine-tuning modes: what is trained, quantised and adapted (the recipe's choices, RECIPE §2.4-2.5).

    full   every parameter trains (ZeRO-2 sharded fp32 masters in the optimizer)
    lora   a frozen base + LoRA adapters
    qlora  an NF4 base (decoder and CLIP linears, the recipe's bitsandbytes scope: every linear but
           lm_head and the projector) + LoRA adapters
`freeze_vision` freezes CLIP, separators and projector in any mode (they then run without autograd).
train.py, bench/ and the memory planner (phi3v.memory) all set a model up through `prepare`.
"""
from __future__ import annotations

import torch

from .config import CLIP_LINEARS, LM_LINEARS, PROJECTOR_LINEARS
from .lora import apply_lora, load_adapter, lora_parameters
from .model import Phi3V
from .nf4 import quantize_nf4

MODES = ("full", "lora", "qlora")


def lora_targets(freeze_vision: bool) -> list[str]:
    """The recipe's LoRA targets: the LM linears and lm_head, plus CLIP and projector unless vision is frozen."""
    return list(LM_LINEARS + ("lm_head",) + (() if freeze_vision else CLIP_LINEARS + PROJECTOR_LINEARS))


def prepare(model: Phi3V, mode: str, freeze_vision: bool = False, lora_rank: int = 64, lora_alpha: float = 128,
            lora_dropout: float = 0.0, targets: list[str] | None = None, adapter=None, seed: int = 0,
            nf4_backend: str = "torch") -> Phi3V:
    """Set `model` up for `mode` in place and return it: requires_grad, NF4 base (qlora), LoRA modules
    (lora/qlora: a new gaussian-initialised adapter on `targets`, default `lora_targets`, or the peft
    `adapter` to continue from), frozen vision. `nf4_backend`: see `quantize_nf4`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.requires_grad_(mode == "full")
    if mode == "qlora":
        quantize_nf4(model, targets=list(LM_LINEARS + CLIP_LINEARS), backend=nf4_backend)
    if mode in ("lora", "qlora"):
        torch.manual_seed(seed)             # the adapter init is part of a run's determinism
        if adapter:
            load_adapter(model, adapter)
        else:
            apply_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, init="gaussian",
                       targets=targets if targets is not None else lora_targets(freeze_vision))
        for p in lora_parameters(model):     # also for an adapter loaded to continue training
            p.requires_grad_(True)
    if freeze_vision:
        model.freeze_vision()
    return model
