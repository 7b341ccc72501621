"""Time NF4 dequantisation at Phi-3.5-vision's decoder weight shapes.

Rows: `torch.ops.phi3v.dequantize_nf4` (on CUDA its Triton kernel when triton is installed), its
chunked torch path called directly (what CPU, or CUDA without triton, runs), and the
implementation it replaced (commit 02e5335, kept here as in tests/test_nf4_op.py). For each: the
median time, the effective bandwidth over the bytes the op must move (packed 0.5 B/element +
absmax + output), and the peak bytes of temporaries beyond the output (CUDA: the caching
allocator's peak; CPU: every allocator event, replayed from the profiler).

    python bench/nf4.py                      # CUDA if available, else CPU (slow: ~1 min)
    python bench/nf4.py --tiny --device cpu  # smoke run, a few seconds

CPU and --tiny figures say nothing about the GPU; never report them as GPU figures.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi3v import nf4                          # noqa: E402
from phi3v.nf4 import quantize_nf4_tensor      # noqa: E402

# qkv_proj, gate_up_proj [out, in] and down_proj; --tiny divides both sides by 8
SHAPES = [(9216, 3072), (16384, 3072), (3072, 8192)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def old_dequantize(q, dtype):
    """The pre-op implementation: int64 nibble indices, float32 levels, a padded copy, float32 product."""
    numel = math.prod(q.shape)
    idx = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1).long()
    vals = F.pad(q.code[idx], (0, (-idx.numel()) % q.block_size)).view(-1, q.block_size)
    scale = q.absmax
    if q.double_quant:
        i = torch.arange(q.absmax.numel(), device=q.absmax.device) // 256
        scale = q.nested_code[q.absmax.long()] * q.nested_absmax[i] + q.offset
    return (vals * scale[:, None]).view(-1)[:numel].view(q.shape).to(dtype)


def op_dequantize(q, dtype):
    return nf4.dequantize_nf4(q, dtype)


def torch_path(q, dtype):
    scale = nf4.block_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset)
    return nf4._dequantize_torch(q.packed, scale, q.code, list(q.shape), q.block_size, dtype)


def _events(nodes):
    for n in nodes:
        yield n
        yield from _events(n.children)


def temporary_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, beyond the tensor it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before - out.untyped_storage().nbytes()
    from torch._C._profiler import _EventType
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    allocs = [e for e in _events(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation]
    for e in sorted(allocs, key=lambda e: e.start_time_ns):
        live += e.extra_fields.alloc_size
        peak = max(peak, live)
    return peak - out.untyped_storage().nbytes()


def median_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--tiny", action="store_true", help="shapes / 8 per side, 1 timed iteration (smoke run)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 on CUDA, 3 on CPU)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    iters = 1 if args.tiny else args.iters or (20 if device.type == "cuda" else 3)
    shapes = [(o // 8, i // 8) for o, i in SHAPES] if args.tiny else SHAPES
    op_name = "op (triton)" if device.type == "cuda" and nf4.TRITON else "op (torch path)"
    impls = [(op_name, op_dequantize)] + ([("torch path", torch_path)] if device.type == "cuda" and nf4.TRITON
                                          else []) + [("old", old_dequantize)]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {args.dtype}, double_quant={args.double_quant}, median of {iters}")
    print(f"{'shape':>14} {'impl':>16} {'ms':>9} {'GB/s':>7} {'temporaries MB':>15} {'B/element':>10}")
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q = quantize_nf4_tensor(torch.randn(shape, generator=g, device=device), double_quant=args.double_quant)
        numel = math.prod(shape)
        # bytes the op must move: packed nibbles, the (8-bit or float32) absmax, the output
        moved = q.packed.numel() + q.absmax.numel() * q.absmax.element_size() + numel * dtype.itemsize
        ref = old_dequantize(q, dtype)
        for name, fn in impls:
            assert torch.equal(fn(q, dtype), ref), f"{name} differs from the old implementation"
            ms = median_ms(lambda: fn(q, dtype), device, warmup=1, iters=iters)
            tmp = temporary_bytes(lambda: fn(q, dtype), device)
            print(f"{'x'.join(map(str, shape)):>14} {name:>16} {ms:9.2f} {moved / ms / 1e6:7.1f} "
                  f"{tmp / 1e6:15.1f} {tmp / numel:10.3f}")


if __name__ == "__main__":
    main()
