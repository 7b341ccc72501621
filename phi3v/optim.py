"""ZeRO-2 AdamW, a dynamic loss scaler for fp16, and the learning-rate schedule.

ZeRO-2 lives in the optimizer (no DDP wrapper, nanochat-style). All trainable parameters are
laid out back to back in one flat fp32 index space, padded so it splits into `n_shards` equal
shards. Rank r owns shard r: its fp32 master weights, Adam moments and (after the
reduce-scatter) its slice of the summed gradient. Frozen parameters never enter the layout, so
a frozen bf16 or NF4 base is never communicated.

The update is the math of `torch.optim.AdamW(foreach=False)` applied elementwise to the shard.
Everything except the cross-rank gradient sum is independent of how the flat space is cut:
shard sizes are multiples of `_CHUNK`, and the global grad norm is summed over fixed chunks in
a fixed order. So for the same summed gradients, 1, 2 or 3 ranks give bitwise the same update,
and a checkpoint written by N ranks can be re-partitioned for M ranks without changing the run.
"""
import math
from pathlib import Path
from typing import Callable, Collection, Iterable

import torch
import torch.distributed as dist

# Shard boundaries and grad-norm partial sums are aligned to this many elements (see above).
_CHUNK = 2048
# Elements per communication bucket (all ranks together): bounds the temporary buffers.
_BUCKET = 1 << 25

# Newer torch spells these *_single; the *_tensor names warn on each call there.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroAdamW:
    """AdamW whose fp32 master weights, moments and gradients are sharded over ranks (ZeRO-2).

    `params`: parameters or `(name, parameter)` pairs, e.g. `model.named_parameters()`; those with
    `requires_grad=False` are ignored. Any dtype works (fp32 LoRA, bf16 full fine-tuning): the
    optimizer keeps fp32 masters and writes `master.to(param.dtype)` back after every step.
    `no_decay`: parameters excluded from weight decay, as a collection of parameters or a
    predicate `(name, param) -> bool`. `mode="allreduce"` keeps the whole state on every rank
    and all-reduces full gradients (DDP-style), which is simpler and cheaper for tiny sets.
    A parameter without a gradient in a step counts as a zero gradient (DDP does the same).
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-7, weight_decay: float = 0.01,
                 no_decay: Collection | Callable | None = None, max_grad_norm: float = 1.0,
                 process_group=None, mode: str = "zero2"):
        if mode not in ("zero2", "allreduce"):
            raise ValueError(f"mode must be 'zero2' or 'allreduce', got {mode!r}")
        named = [item if isinstance(item, tuple) else (f"param{i}", item)
                 for i, item in enumerate(params)]
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named:
            raise ValueError("ZeroAdamW got no trainable parameters")
        seen = set()
        for n, p in named:
            if not p.is_contiguous():
                raise ValueError(f"parameter {n} is not contiguous")
            if id(p) in seen:  # tied weights would be updated twice
                raise ValueError(f"parameter {n} is given twice")
            seen.add(id(p))
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.max_grad_norm, self.mode = weight_decay, max_grad_norm, mode
        self.group = process_group
        self.step_count = 0

        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        # Only zero2 splits the state; allreduce keeps one shard holding everything.
        self.n_shards = self.world if mode == "zero2" else 1
        self.shard_rank = self.rank if mode == "zero2" else 0

        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.shard_numel = math.ceil(total / (self.n_shards * _CHUNK)) * _CHUNK
        self.bucket = max(_CHUNK, _BUCKET // self.n_shards // _CHUNK * _CHUNK)
        start = self.shard_rank * self.shard_numel
        end = start + self.shard_numel

        # Decay is applied per contiguous range of the shard, i.e. per parameter as in torch.
        if callable(no_decay):
            skip = [bool(no_decay(n, p)) for n, p in named]
        else:
            ids = {id(p) for p in (no_decay or ())}
            skip = [id(p) in ids for p in self.params]
        self.decay_ranges = []
        for p, off, s in zip(self.params, self.offsets, skip):
            lo, hi = max(start, off) - start, min(end, off + p.numel()) - start
            if s or lo >= hi:
                continue
            if self.decay_ranges and self.decay_ranges[-1][1] == lo:
                self.decay_ranges[-1] = (self.decay_ranges[-1][0], hi)
            else:
                self.decay_ranges.append((lo, hi))

        device = self.params[0].device
        self.master = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self._read_params(start, self.master)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # The reduced gradient shard. With one rank there is nothing to reduce: gradients are read
        # from p.grad bucket by bucket instead, saving a full fp32 copy (4 bytes/param, 16 GB for
        # full fine-tuning of the 4.1B model on one GPU).
        if self.world > 1:
            self.grad, self._bucket_buf = torch.zeros_like(self.master), None
        else:
            self.grad = None
            self._bucket_buf = torch.empty(min(self.bucket, self.shard_numel), dtype=torch.float32, device=device)

    # --- moving data between the parameters and the flat index space -------------------------

    def _overlaps(self, start: int, n: int):
        """Yield (param, slice in the param's flat view, slice in [start, start+n))."""
        for p, off in zip(self.params, self.offsets):
            lo, hi = max(start, off), min(start + n, off + p.numel())
            if lo < hi:
                yield p, slice(lo - off, hi - off), slice(lo - start, hi - start)

    def _read_grads(self, start: int, out: torch.Tensor) -> None:
        out.zero_()  # padding and params without a gradient
        for p, src, dst in self._overlaps(start, out.numel()):
            if p.grad is not None:
                out[dst].copy_(p.grad.reshape(-1)[src])

    def _read_params(self, start: int, out: torch.Tensor) -> None:
        for p, src, dst in self._overlaps(start, out.numel()):
            out[dst].copy_(p.detach().view(-1)[src])

    def _write_params(self, start: int, src_flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, dst, src in self._overlaps(start, src_flat.numel()):
                p.view(-1)[dst].copy_(src_flat[src])

    def _buckets(self):
        for col in range(0, self.shard_numel, self.bucket):
            yield col, min(self.bucket, self.shard_numel - col)

    def _reduce_grads(self) -> None:
        """Fill self.grad with this rank's shard of the gradient summed over ranks."""
        S = self.shard_numel
        for col, width in self._buckets():
            if self.mode == "zero2" and self.world > 1:
                # Row r holds shard r's columns [col, col+width); rank r receives row r summed.
                send = torch.empty(self.world, width, device=self.grad.device)
                for r in range(self.world):
                    self._read_grads(r * S + col, send[r])
                _reduce_scatter(self.grad[col:col + width], send.view(-1), group=self.group)
            else:
                self._read_grads(self.shard_rank * S + col, self.grad[col:col + width])
                if self.world > 1:
                    dist.all_reduce(self.grad[col:col + width], group=self.group)

    def _sync_params(self) -> None:
        """Write every shard's master weights into the parameters (cast to their dtype)."""
        S = self.shard_numel
        for col, width in self._buckets():
            if self.n_shards > 1:
                recv = torch.empty(self.n_shards, width, device=self.master.device)
                _all_gather(recv.view(-1), self.master[col:col + width], group=self.group)
                for r in range(self.n_shards):
                    self._write_params(r * S + col, recv[r])
            else:
                self._write_params(col, self.master[col:col + width])

    def _grad_slices(self, scale: float = 1.0, coef: float = 1.0):
        """Yield (col, fp32 gradient of shard columns [col, col+width)) bucket by bucket.

        With several ranks these are views of the reduced self.grad (already scaled in step());
        with one rank each bucket is read from p.grad and multiplied by `scale`, then `coef`, the
        same operations in the same order, so the result is bitwise that of the other path.
        """
        for col, width in self._buckets():
            if self.grad is not None:
                yield col, self.grad[col:col + width]
                continue
            g = self._bucket_buf[:width]
            self._read_grads(col, g)
            if scale != 1.0:
                g.mul_(scale)
            if coef < 1.0:
                g.mul_(coef)
            yield col, g

    def _global_grad_norm(self, scale: float = 1.0) -> float:
        # Sum of squares per fixed chunk, in float64. Each chunk lives on exactly one rank, so
        # the all-reduce adds only zeros to it and the final sum runs in the same order for
        # any world size.
        local = torch.cat([(g.view(-1, _CHUNK) ** 2).sum(dim=1, dtype=torch.float64)
                           for _, g in self._grad_slices(scale)])
        rows = local.numel()
        if self.n_shards > 1:
            sums = torch.zeros(self.n_shards * rows, dtype=torch.float64, device=local.device)
            sums[self.shard_rank * rows:(self.shard_rank + 1) * rows] = local
            dist.all_reduce(sums, group=self.group)
        else:
            sums = local
        # Rows past the data are all padding; leaving them out keeps the order world-independent.
        return math.sqrt(sums[:math.ceil(self.numel / _CHUNK)].sum().item())

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> float:
        """Sum gradients over ranks, scale, clip, update and broadcast the new weights.

        `grad_scale` multiplies the summed gradient first: pass 1/(global supervised-token count)
        for sum-reduced losses (and also 1/loss_scale with fp16). Returns the global gradient
        norm before clipping. If it is inf or nan nothing is updated (the step is skipped and
        not counted); the caller sees that in the returned value.
        """
        stream = self.grad is None          # one rank: gradients read per bucket (see __init__)
        if not stream:
            self._reduce_grads()
            if grad_scale != 1.0:
                self.grad.mul_(grad_scale)
        norm = self._global_grad_norm(grad_scale if stream else 1.0)
        if not math.isfinite(norm):
            return norm
        coef = 1.0
        if self.max_grad_norm and self.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s coefficient, applied only when it shrinks.
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1.0 and not stream:
                self.grad.mul_(coef)

        # torch.optim.AdamW, single-tensor path, in the same order of operations (per element).
        self.step_count += 1
        lr, (beta1, beta2) = self.lr, self.betas
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2 = 1 - beta2 ** self.step_count
        step_size = lr / bias_correction1
        for col, g in self._grad_slices(grad_scale, coef) if stream else self._grad_slices():
            end = col + g.numel()
            if self.weight_decay != 0:
                for lo, hi in self.decay_ranges:
                    if max(lo, col) < min(hi, end):
                        self.master[max(lo, col):min(hi, end)].mul_(1 - lr * self.weight_decay)
            master, exp_avg, exp_avg_sq = self.master[col:end], self.exp_avg[col:end], self.exp_avg_sq[col:end]
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
            master.addcdiv_(exp_avg, denom, value=-step_size)

        self._sync_params()
        return norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's shard (step, fp32 master, moments) plus the layout needed to re-partition."""
        return {
            "step": self.step_count,
            "master": self.master.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "layout": {
                "mode": self.mode,
                "names": list(self.names),
                "shapes": [list(p.shape) for p in self.params],
                "offsets": list(self.offsets),
                "numel": self.numel,
                "shard_numel": self.shard_numel,
                "n_shards": self.n_shards,
                "shard_rank": self.shard_rank,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a shard written by this same rank in the same layout. Collective."""
        layout = state["layout"]
        self._check_params(layout)
        if (layout["n_shards"], layout["shard_rank"]) != (self.n_shards, self.shard_rank):
            raise ValueError(
                f"state is shard {layout['shard_rank']} of {layout['n_shards']}, this optimizer "
                f"owns shard {self.shard_rank} of {self.n_shards}; use load_sharded()")
        self.load_sharded([state])

    def load_sharded(self, states: list) -> None:
        """Load the shards of all ranks of a checkpoint (dicts or paths to `torch.save` files),
        written by any number of ranks in either mode, re-partitioning them for this world.

        Collective: every rank calls it with the same list. Paths are memory-mapped, so a rank
        reads only the parts that overlap its own shard.
        """
        by_shard = {}
        for s in states:
            if isinstance(s, (str, Path)):
                s = torch.load(s, map_location="cpu", mmap=True, weights_only=True)
            by_shard.setdefault(s["layout"]["shard_rank"], s)  # allreduce mode: identical copies
        layout = next(iter(by_shard.values()))["layout"]
        self._check_params(layout)
        n_old, s_old = layout["n_shards"], layout["shard_numel"]
        if sorted(by_shard) != list(range(n_old)):
            raise ValueError(f"need shards 0..{n_old - 1}, got {sorted(by_shard)}")
        steps = {s["step"] for s in by_shard.values()}
        if len(steps) != 1:
            raise ValueError(f"shards disagree on the step count: {sorted(steps)}")

        start = self.shard_rank * self.shard_numel
        for name in ("master", "exp_avg", "exp_avg_sq"):
            mine = getattr(self, name)
            mine.zero_()
            for r, s in by_shard.items():
                lo = max(start, r * s_old)
                hi = min(start + self.shard_numel, (r + 1) * s_old, self.numel)
                if lo < hi:
                    mine[lo - start:hi - start].copy_(s[name][lo - r * s_old:hi - r * s_old])
        self.step_count = steps.pop()
        self._sync_params()

    def _check_params(self, layout: dict) -> None:
        mine = list(zip(self.names, [list(p.shape) for p in self.params]))
        theirs = list(zip(layout["names"], layout["shapes"]))
        if mine != theirs:
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a != b:
                    raise ValueError(f"optimizer state param {i} is {b[0]} {b[1]}, "
                                     f"this optimizer has {a[0]} {a[1]}")
            raise ValueError(f"optimizer state has {len(theirs)} params, this optimizer {len(mine)}")


class DynamicLossScaler:
    """fp16 dynamic loss scaling: halve the scale on overflow, double it after
    `growth_interval` clean steps, never below `min_scale`.

    Multiply the loss by `scale` before backward, pass 1/scale into the optimizer's
    `grad_scale`, then call `update(grad_norm)` with what `step()` returned.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000,
                 min_scale: float = 1.0, enabled: bool = True):
        # disabled (bf16/fp32 training): scale 1 and never an overflow, so the loop needs no branches
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = float(min_scale)
        self.good_steps = 0

    def update(self, grad_norm: float) -> bool:
        """Adjust the scale; returns True if the step overflowed (and so was skipped)."""
        if not self.enabled:
            return False
        if not math.isfinite(grad_norm):
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
            return True
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "linear") -> float:
    """Learning rate for 0-based optimizer step `step`: linear warmup from 0, then linear or
    cosine decay to 0 at `total_steps` (HF's "linear" / "cosine" schedules; lr(0) = 0 as there)."""
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
    # Same float expressions as transformers' schedule lambdas, so the values match bitwise.
    if step < warmup_steps:
        return peak_lr * (step / max(1, warmup_steps))
    if schedule == "linear":
        return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def no_decay(name: str, p: torch.Tensor) -> bool:
    """The HF Trainer's rule for `ZeroAdamW(no_decay=...)`: no weight decay for biases and norm
    weights (LayerNorm and RMSNorm here), nor for any other parameter of fewer than 2 dimensions."""
    return name.endswith("bias") or "norm" in name.rsplit(".", 2)[-2] or p.dim() < 2
