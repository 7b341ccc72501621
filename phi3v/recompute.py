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

Activation offloading (`--offload_activations`, any policy): `offload_saved` keeps what autograd saves
for backward outside the recomputed layers (with "full": each layer's input, the RoPE tables, the
projector's and the loss's inputs), weights excepted, in host memory from the forward until backward
needs it. It costs a copy each way over PCIe and saves that much GPU memory (about 1 GB for a DocVQA
sample with full recomputation).
"""
from __future__ import annotations

import functools
import itertools
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes
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


MIN_OFFLOAD_BYTES = 1 << 20   # smaller saved tensors (indices, norms' rstd) stay: not worth a copy each


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory exactly once in some dimension order (a permuted
    contiguous tensor): then a copy with the same strides is the same size."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1:
            if t.stride(d) != expected:
                return False
            expected *= t.size(d)
    return True


class _OnHost:
    """A saved tensor moved to host memory (pinned, copied without waiting, on CUDA); on the meta
    device (the memory plan) only its shape: the plan needs no values."""

    def __init__(self, t: torch.Tensor):
        self.device, self.size, self.stride, self.dtype = t.device, t.size(), t.stride(), t.dtype
        self.host = None
        if t.device.type != "meta":
            # host memory: made outside any dispatch mode, so memory.LiveBytes (device memory) skips it
            with _disable_current_modes():
                self.host = torch.empty_strided(self.size, self.stride, dtype=self.dtype, pin_memory=t.is_cuda)
                self.host.copy_(t, non_blocking=t.is_cuda)

    def to_device(self) -> torch.Tensor:
        if self.host is None:
            return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=self.device)
        # same strides as saved (a compiled backward expects them); a new tensor also on a CPU "device"
        return self.host.to(self.device, non_blocking=True, copy=True)


def offload_saved(model: torch.nn.Module):
    """A context in which autograd keeps the tensors it saves for backward in host memory, except
    the model's parameters and buffers (and views of them), tensors under MIN_OFFLOAD_BYTES (read
    at each call: tests and bench/compile_check.py lower it), and tensors whose strides overlap or
    leave gaps (expanded views: small storages). A tensor saved several times (the RoPE tables by
    every block) is copied once. Values come back bitwise equal."""
    min_bytes = MIN_OFFLOAD_BYTES
    weights = {t.untyped_storage() for t in itertools.chain(model.parameters(), model.buffers())}
    copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # device storage -> {view: _OnHost}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st in weights or t.numel() * t.element_size() < min_bytes or not _dense(t):
            return t
        views = copies.setdefault(st, {})
        view = (t.storage_offset(), tuple(t.size()), t.stride(), t.dtype)
        if view not in views:
            views[view] = _OnHost(t)
        return views[view]

    def unpack(saved):
        return saved.to_device() if isinstance(saved, _OnHost) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
