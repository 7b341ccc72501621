"""Scaled dot-product attention as the GPU runs it, for the decoder and CLIP.

SDPA (torch's flash / memory-efficient kernels) everywhere; flash-attn's kernel for causal CUDA
fp16/bf16 when that optional package is installed; and on meta tensors (memory planning,
phi3v.memory) the kernel a GPU would pick, so the plan holds its memory rather than the math
fallback's T x S score matrix.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def use_flash_attn(q: torch.Tensor) -> bool:
    """flash-attn (optional; SDPA is the default fast path) for causal CUDA fp16/bf16."""
    return FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, H, S, hd] -> [B, H, T, hd]. mask: "causal", None, or a bool / additive
    tensor broadcastable to [B, H, T, S]."""
    if isinstance(mask, str) and use_flash_attn(q):      # optional fast path when flash-attn is installed
        from flash_attn import flash_attn_func
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    if q.is_meta:
        # memory planning (phi3v.memory): SDPA on meta tensors falls back to the math path with its
        # T x S score matrix; run the kernel a GPU runs instead, so the plan holds its memory
        if isinstance(mask, str) or mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, isinstance(mask, str))[0]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device) if mask.dtype == torch.bool else mask
        bias = bias.expand(*q.shape[:2], *mask.shape[2:])                   # [B, H, T, S]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]
    if isinstance(mask, str):   # "causal": no padding, no past keys
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
