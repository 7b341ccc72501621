"""How the training forward runs each decoder block, CLIP layer and the projector: activation
recomputation and torch.compile.

Recomputation policies (`--recompute`):
  none       keep every activation for backward: fastest, most memory.
  selective  keep the outputs of the matmuls and of attention, recompute the cheap pointwise ops
             (norms, RoPE, activation functions, residual adds) in backward: torch's selective
             activation checkpointing.
  full       keep only each layer's input and recompute the whole layer in backward: least memory.

Compilation: one `torch.compile(fullgraph=True, dynamic=True)` of `_run`, shared by every layer.
nn.Module arguments are inlined with their parameters as graph inputs, so the 32 decoder blocks
reuse one graph; `dynamic=True` makes the token (and crop) counts symbolic, so sequences of new
lengths do not recompile. Expect one graph per (layer type, grad mode, attention mask kind) and
one more the first time a batch size of 1 becomes larger (0/1 sizes are specialised).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

POLICIES = ("none", "selective", "full")

_aten = torch.ops.aten
# what selective recomputation keeps: matmul outputs and the attention kernels' outputs
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
         _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _run(layer: torch.nn.Module, recompute: str, *args):
    if recompute == "none" or not torch.is_grad_enabled():
        return layer(*args)
    context = _selective_context if recompute == "selective" else noop_context_fn
    return checkpoint(layer, *args, use_reentrant=False, context_fn=context)


@functools.cache
def _compiled_run():
    return torch.compile(_run, fullgraph=True, dynamic=True)


def run_layer(layer: torch.nn.Module, recompute: str, compiled: bool, *args):
    """layer(*args) under the recomputation policy (ignored without grad), compiled or eager."""
    return (_compiled_run() if compiled else _run)(layer, recompute, *args)


def check_policy(recompute: str) -> str:
    if recompute not in POLICIES:
        raise ValueError(f"recompute must be one of {POLICIES}, got {recompute!r}")
    return recompute
