"""How the training forward runs each decoder block, CLIP layer and the projector: activation
recomputation and torch.compile.

Recomputation policies (`--recompute`):
  none       keep every activation for backward: fastest, most memory.
  selective  keep the outputs of the full-size matmuls and of attention, recompute the cheap ops
             (norms, RoPE, activation functions, residual adds, LoRA's low-rank updates) in
             backward: torch's selective activation checkpointing.
  full       keep only each layer's input and recompute the whole layer in backward: least memory.

Compilation: `torch.compile(fullgraph=True, dynamic=True)` of one small runner per layer kind
(decoder block, CLIP layer, projector). nn.Module arguments are inlined with their parameters as
graph inputs, so the 32 decoder blocks share one graph; `dynamic=True` makes the token (and crop)
counts symbolic, so sequences of new lengths do not recompile. Expect one graph per layer kind and
attention mask kind ("causal" or a packed block mask), one more for the first CLIP layer when its
input needs no grad (LoRA on CLIP), and one more the first time a micro-batch of 1 sample grows
(sizes 0 and 1 are specialised).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "selective", "full")

_aten = torch.ops.aten
_ATTENTION = {_aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default}
_MATMUL = {_aten.mm.default: 0, _aten.bmm.default: 0, _aten.addmm.default: 1}   # op -> index of its left factor
MIN_INNER = 512   # a matmul whose inner dimension is below this (LoRA's rank-r updates) is cheap to redo


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep attention and full-size matmul outputs; recompute pointwise ops and low-rank matmuls
    (a LoRA update costs r/in of its base matmul, while keeping it would double the memory)."""
    if op in _ATTENTION or (op in _MATMUL and args[_MATMUL[op]].shape[-1] >= MIN_INNER):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _run(layer: torch.nn.Module, recompute: str, *args):
    if recompute == "none" or not torch.is_grad_enabled():
        return layer(*args)
    if recompute == "selective":
        return checkpoint(layer, *args, use_reentrant=False, context_fn=_selective_context)
    return checkpoint(layer, *args, use_reentrant=False)


# One entry point per layer kind: torch.compile caches graphs per code object (at most 8 each), so
# the decoder blocks, the CLIP layers and the projector each get their own.
def _run_block(block, recompute, x, cos, sin, mask):
    return _run(block, recompute, x, cos, sin, mask)


def _run_clip_layer(layer, recompute, x):
    return _run(layer, recompute, x)


def _run_projector(projector, recompute, x):
    return _run(projector, recompute, x)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=True)


def run_block(block: torch.nn.Module, recompute: str, compiled: bool, x, cos, sin, mask):
    """A decoder block under the recomputation policy (ignored without grad), compiled or eager."""
    return (_compiled(_run_block) if compiled else _run_block)(block, recompute, x, cos, sin, mask)


def run_clip_layer(layer: torch.nn.Module, recompute: str, compiled: bool, x):
    return (_compiled(_run_clip_layer) if compiled else _run_clip_layer)(layer, recompute, x)


def run_projector(projector: torch.nn.Module, compiled: bool, x):
    """The image projector (small: never recomputed)."""
    return (_compiled(_run_projector) if compiled else _run_projector)(projector, "none", x)


def check_policy(recompute: str) -> str:
    if recompute not in POLICIES:
        raise ValueError(f"recompute must be one of {POLICIES}, got {recompute!r}")
    return recompute
