"""The Triton kernel behind `torch.ops.phi3v.dequantize_nf4` on CUDA (optional: needs `triton`).

Per weight element it reads half a packed byte and, once per block of 64, a float32 absmax
(0.5 + 4/64 bytes) and writes the output once (2 bytes in bf16/fp16): no temporaries. The
per-block absmax arrives already reconstructed in float32 (double quantisation is undone by torch
in nf4.py, on 1/64 of the elements), so the kernel's only arithmetic is one float32 multiply,
code[nibble] * absmax[block], rounded once to the output dtype: the torch path's exact formula.

Importing this module imports triton. Tests run the kernel on CPU tensors under TRITON_INTERPRET=1
(set before triton is imported).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

TILE = 1024   # output elements per program


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, code_ptr, out_ptr, numel,
                       BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, OUT_BF16: tl.constexpr):
    # int64 offsets: a weight may hold more than 2^31 elements
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)          # uint8, two elements per byte
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)             # first element in the high nibble
    level = tl.load(code_ptr + nibble, mask=mask, other=0.0)            # float32 NF4 level (16-entry table)
    scale = tl.load(scale_ptr + offs // BLOCK_SIZE, mask=mask, other=0.0)
    w = level * scale                                                   # the one float32 product
    if OUT_BF16:
        # round to nearest even with torch's own integer formula (c10::BFloat16): the GPU's cvt.rn
        # gives the same, but Triton's CPU interpreter truncates, and the tests run this code there
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(w != w, 0x7FC0, bits)                           # NaN stays a (quiet) NaN
        tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)   # fp16: round to nearest even


def dequantize(packed: torch.Tensor, scale: torch.Tensor, code: torch.Tensor, shape: list[int],
               block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """code[nibble] * scale[block] rounded to `dtype`, shaped `shape`; scale is float32 [n_blocks]."""
    numel = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if numel:
        grid = (triton.cdiv(numel, TILE),)
        # Triton launches on the current CUDA device: make it the tensors' (CPU: the interpreter)
        with torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext():
            _dequantize_kernel[grid](packed, scale, code, out, numel, BLOCK_SIZE=block_size, TILE=TILE,
                                     OUT_BF16=dtype == torch.bfloat16)
    return out
