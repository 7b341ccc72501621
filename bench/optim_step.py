"""Time one ZeroAdamW step against torch's fastest single-device equivalent on the same fp32 parameters.

    python bench/optim_step.py                      # CPU, 50M parameters, median of 10 steps after 3 warm-up
    python bench/optim_step.py --device cuda --params 1e9
    python bench/optim_step.py --check              # also: ZeroAdamW == AdamW(foreach=False) within 1e-6
    python bench/optim_step.py --threads 1          # on a shared machine: fewer OpenMP barrier stalls

Both sides do the same work: global-norm clipping, then AdamW (0.9, 0.95, eps 1e-7, weight decay 0.01
on matrices only). The baseline is `clip_grad_norm_(foreach=True)` + `torch.optim.AdamW(fused=True)`.
The parameters are shaped like 4 transformer blocks (qkv, out, fc1, fc2 matrices; biases; norms). The
gradients are reset (untimed) before every timed step, and the two sides alternate step by step, so
machine noise hits both alike. World size 1 (no process group).
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi3v.optim import ZeroAdamW                  # noqa: E402

LR, BETAS, EPS, WD, MAX_NORM = 1e-3, (0.9, 0.95), 1e-7, 0.01, 1.0


def shapes(n_params: float) -> list[tuple[int, ...]]:
    """4 blocks of width d: qkv [3d, d] + bias, out [d, d] + bias, fc1 [4d, d] + bias, fc2 [d, 4d] + bias,
    two norms; d is chosen so the total is about n_params (12 d^2 per block)."""
    d = max(8, int(math.sqrt(n_params / 48)))
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    return block * 4


def make_params(shp, device, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shp]


def make_grads(shp, device, seed=1) -> list[torch.Tensor]:
    """Gradients whose global norm is about 3, so clipping (max norm 1) is active."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in shp)
    return [(torch.randn(s, generator=g) * (3 / math.sqrt(total))).to(device) for s in shp]


def torch_adamw(params, **kw) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    skip = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay}, {"params": skip, "weight_decay": 0.0}], lr=LR, betas=BETAS,
                             eps=EPS, weight_decay=WD, **kw)


def zero_adamw(params) -> ZeroAdamW:
    return ZeroAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, max_grad_norm=MAX_NORM,
                     no_decay=lambda n, p: p.dim() < 2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench(shp, device, steps, warmup) -> tuple[float, float]:
    """Median seconds per step of (ZeroAdamW, clip + fused AdamW), alternating step by step."""
    grads = make_grads(shp, device)
    ours, ref = make_params(shp, device), make_params(shp, device)
    opt, ref_opt = zero_adamw(ours), torch_adamw(ref, fused=True)

    def reset(params):
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def ours_step():
        opt.step()

    def ref_step():
        torch.nn.utils.clip_grad_norm_(ref, MAX_NORM, foreach=True)
        ref_opt.step()

    times = ([], [])
    for i in range(warmup + steps):
        for params, fn, out in ((ours, ours_step, times[0]), (ref, ref_step, times[1])):
            reset(params)
            t = timed(fn, device)
            if i >= warmup:
                out.append(t)
    return statistics.median(times[0]), statistics.median(times[1])


def check(shp, device, steps=4) -> float:
    """ZeroAdamW against AdamW(foreach=False) (the op order tests/test_optim.py checks it against), with
    a 1/n_tokens-style gradient scale and clip_grad_norm_'s coefficient; returns the largest |difference|.
    The reference norm is taken in float64: clip_grad_norm_'s own fp32 sums drift by ~1e-4 at 50M
    elements, more than the two optimizers differ."""
    ours, ref = make_params(shp, device), make_params(shp, device)
    opt, ref_opt = zero_adamw(ours), torch_adamw(ref, foreach=False)
    worst, clipped = 0.0, []
    for s in range(steps):
        grads = make_grads(shp, device, seed=10 + s)
        scale = 1 / 7 if s % 2 else 1 / 2           # some steps clipped, some not
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = opt.step(grad_scale=scale)
        for q in ref:
            q.grad.mul_(scale)
        ref_norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(q.grad, dtype=torch.float64) for q in ref]))
        torch.nn.utils.clip_grads_with_norm_(ref, MAX_NORM, ref_norm, foreach=False)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        clipped.append(ref_norm.item() > MAX_NORM)
        assert math.isclose(norm, ref_norm.item(), rel_tol=1e-6), (norm, ref_norm.item())
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.data, q.data, rtol=1e-5, atol=1e-6)
            worst = max(worst, (p.data - q.data).abs().max().item())
    assert any(clipped) and not all(clipped), clipped
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=50e6, help="about this many fp32 parameters")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--check", action="store_true", help="also check ZeroAdamW == AdamW(foreach=False) within 1e-6")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shp = shapes(args.params)
    n = sum(math.prod(s) for s in shp)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")
    print(f"{where}, torch {torch.__version__}: {n / 1e6:.1f}M fp32 parameters in {len(shp)} tensors, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    ours, ref = bench(shp, device, args.steps, args.warmup)
    print(f"ZeroAdamW.step (clipping included)              {ours * 1e3:9.1f} ms")
    print(f"clip_grad_norm_(foreach) + AdamW(fused=True)    {ref * 1e3:9.1f} ms")
    print(f"ratio ZeroAdamW / torch                         {ours / ref:9.2f}")
    if args.check:
        worst = check(shp, device)
        print(f"check: ZeroAdamW == clip_grad_norm_ + AdamW(foreach=False), max |diff| {worst:.2g} "
              "(atol 1e-6, rtol 1e-5)")


if __name__ == "__main__":
    main()
