"""ZeRO-2 AdamW, a dynamic loss scaler for fp16, and the learning-rate schedule.

ZeRO-2 lives in the optimizer (no DDP wrapper, nanochat-style). All trainable parameters are laid
out back to back, in the order given, in one flat index space padded so it splits into `world`
equal shards, and they become views of one flat buffer of their dtype (full on every rank, as ZeRO-2
keeps whole parameters). Rank r owns shard r: its fp32 master weights, Adam moments and, after the
reduction, its slice of the summed gradient. fp32 parameters (LoRA) need no master: their shard of
the flat buffer is it, so nothing is copied or written back. Frozen parameters never enter the
layout, so a frozen bf16 or NF4 base is never communicated.

A step is two passes over the shard: the global gradient norm, then torch's fused AdamW kernel
(`torch._fused_adamw_`, what `AdamW(fused=True)` runs), which reads master, gradient and moments once,
applies grad scale and clip coefficient on the way and writes them back. With fp32 parameters on one
rank that moves 36 bytes per parameter (the unfused update moved about 164).

Apart from the cross-rank gradient sum, nothing depends on the world size: the work is cut only at
places that do not move with it:
- shards are multiples of `_CHUNK` elements;
- the norm adds up fixed pieces (each parameter's part of each `_CHUNK`-aligned chunk), each reduced
  by the same kernel over the same elements in any world, in float64 and a fixed order;
- the fused kernel is called on pieces cut at multiples of `_VEC` elements: its CPU version rounds the
  elements of a partial vector (the scalar tail) differently from full ones.
So for the same summed gradients 1, 2 or 3 ranks give bitwise the same update (tested on CPU; CUDA
reduction kernels choose their summation order by shape, so there the norm, and with it a clipped
update, may differ in the last bit), and a checkpoint written by N ranks can be re-partitioned for M
ranks without changing the run.

With several ranks each gradient reaches its owner by `dist.reduce`, bucket by bucket over the flat
space (contiguous ranges, last first as backward produces them; DeepSpeed's ZeRO-2 does the same).
Set `opt.sync_grads = True` before the last backward of a step and each bucket starts as soon as all
its gradients are accumulated, overlapping the rest of the backward; step() starts whatever is left.
Backward never waits for a reduction (at most `_IN_FLIGHT` buckets are in flight, further ones wait
for later hooks or step()): another rank may start its reductions only in step(), after collectives
of its own loop (e.g. when its last micro-batch was empty), which is also why the optimizer
communicates on a process group of its own. World size 1 has none of this.
"""
import functools
import math
from pathlib import Path
from typing import Callable, Collection, Iterable

import torch
import torch.distributed as dist

# Shard boundaries and the grad-norm pieces are aligned to this many elements (see above).
_CHUNK = 2048
# The fused kernel's pieces are aligned to this many elements: a multiple of any CPU vector width.
_VEC = 16
# Elements per bucket (a range of the flat space): bounds the gradient copies in flight.
_BUCKET = 1 << 25
# Reduction buckets in flight during backward.
_IN_FLIGHT = 2

# Newer torch spells this *_single; the *_tensor name warns on each call there.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _trainable(params: Iterable) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs of the trainable ones, checked: contiguous, each once, one dtype and device."""
    named = [item if isinstance(item, tuple) else (f"param{i}", item) for i, item in enumerate(params)]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("ZeroAdamW got no trainable parameters")
    first, p0 = named[0]
    seen = set()
    for n, p in named:
        if not p.is_contiguous():
            raise ValueError(f"parameter {n} is not contiguous")
        if id(p) in seen:  # tied weights would be updated twice
            raise ValueError(f"parameter {n} is given twice")
        if (p.dtype, p.device) != (p0.dtype, p0.device):
            raise ValueError(f"parameter {n} is {p.dtype} on {p.device}, {first} {p0.dtype} on {p0.device}: "
                             "ZeroAdamW keeps the parameters in one flat buffer of one dtype")
        seen.add(id(p))
    return named


def _shard_numel(numel: int, world: int) -> int:
    return math.ceil(numel / (world * _CHUNK)) * _CHUNK


def _split(a: int, b: int, q: int) -> list[tuple[int, int]]:
    """[a, b) cut at the first and last multiple of q inside it: a head and a tail shorter than q
    around a q-aligned middle (empty parts left out)."""
    h = min(b, -(-a // q) * q)
    t = max(h, b // q * q)
    return [(x, y) for x, y in ((a, h), (h, t), (t, b)) if x < y]


def _n_pieces(a: int, b: int) -> int:
    """Grad-norm pieces of flat [a, b): one per `_CHUNK`-aligned chunk it touches."""
    return (b - 1) // _CHUNK - a // _CHUNK + 1


def _piece_norms(g: torch.Tensor, a: int) -> list[torch.Tensor]:
    """L2 norms of gradient `g` (flat elements [a, a + len)) per grad-norm piece: whole chunks as rows of
    a [rows, _CHUNK] view, a partial chunk at either end as one row [1, n]."""
    return [torch.linalg.vector_norm(g[x - a:y - a].view(-1, min(_CHUNK, y - x)), dim=1)
            for x, y in _split(a, a + g.numel(), _CHUNK)]


class ZeroAdamW:
    """AdamW whose fp32 master weights, moments and gradients are sharded over ranks (ZeRO-2).

    `params`: parameters or `(name, parameter)` pairs, e.g. `model.named_parameters()`; those with
    `requires_grad=False` are ignored. The others must share one dtype and device, and become views of
    the optimizer's flat buffer (so build the optimizer after moving the model). fp32 parameters are
    their own masters; others (bf16 full fine-tuning) get fp32 masters, cast back after each step.
    `no_decay`: parameters excluded from weight decay, as a collection of parameters or a predicate
    `(name, param) -> bool`. A parameter without a gradient in a step counts as a zero gradient (DDP
    does the same). `sync_grads`: set it for the last backward of each step (module docstring).
    `offload`: keep the fp32 masters and moments in host memory and run the update on the CPU (the
    same fused kernel): the GPU then holds only the parameters and their gradients. It moves the
    shard's gradients to the host and the new weights back once per step, which costs little when
    a step accumulates many micro-batches (LoRA: 12 bytes per trainable parameter off the GPU).
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-7, weight_decay: float = 0.01,
                 no_decay: Collection | Callable | None = None, max_grad_norm: float = 1.0,
                 process_group=None, offload: bool = False):
        named = _trainable(params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.max_grad_norm = weight_decay, max_grad_norm
        self.step_count = 0
        self.sync_grads = False

        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        S = self.shard_numel = _shard_numel(total, self.world)
        self.base = self.rank * S                  # this rank's shard is flat [base, base + S)
        self.bucket = _BUCKET                      # a multiple of _CHUNK
        if callable(no_decay):
            skip = [bool(no_decay(n, p)) for n, p in named]
        else:
            ids = {id(p) for p in (no_decay or ())}
            skip = [id(p) in ids for p in self.params]

        # The parameters move into one flat buffer [world * S] (zero padding at the end).
        dtype, device = self.params[0].dtype, self.params[0].device
        self.flat = torch.zeros(self.world * S, dtype=dtype, device=device)
        for p, off in zip(self.params, self.offsets):
            view = self.flat[off:off + p.numel()]
            view.copy_(p.detach().view(-1))
            p.data = view.view(p.shape)
        shard = self.flat[self.base:self.base + S]
        self.offload = offload
        state_device = torch.device("cpu") if offload else device       # where the update runs
        # [S] fp32 masters: the shard itself when it is fp32 on the same device, else a copy
        self.master = shard if dtype == torch.float32 and not offload else \
            shard.to(state_device, torch.float32, copy=True)
        self.exp_avg = torch.zeros(S, device=state_device)
        self.exp_avg_sq = torch.zeros(S, device=state_device)
        self._step = torch.zeros((), device=state_device)   # the fused kernel reads the step count here

        # The shard as (param index, flat start, flat end) segments, bucket by bucket (a bucket bounds
        # the fp32 gradient copies of non-fp32 parameters at world size 1), and the fused kernel's
        # arguments for each bucket.
        self.buckets = [self._segments(lo, min(lo + self.bucket, self.base + S))
                        for lo in range(self.base, self.base + S, self.bucket)]
        self._pieces = [self._fused_pieces(segs, skip) for segs in self.buckets]

        self.grad = None                                 # world 1: gradients are read from p.grad
        if self.world > 1:
            ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            self._group = dist.new_group(ranks, use_local_synchronization=True)
            self.grad = torch.zeros(S, device=device)    # [S] this rank's shard of the summed gradient
            # Grad-norm pieces of all ranks, and the index of this rank's first one.
            ends = [(o, o + p.numel()) for p, o in zip(self.params, self.offsets)]
            self._n_norms = sum(_n_pieces(a, b) for a, b in ends)
            self._norm0 = sum(_n_pieces(a, min(b, self.base)) for a, b in ends if a < self.base)
            # Reduction buckets: flat [k * bucket, (k + 1) * bucket), started last first.
            n_buckets = -(-self.world * S // self.bucket)
            self._comm = [self._segments(k * self.bucket, min((k + 1) * self.bucket, self.world * S))
                          for k in range(n_buckets)]
            self._touch = [range(o // self.bucket, (o + p.numel() - 1) // self.bucket + 1)
                           for p, o in zip(self.params, self.offsets)]
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
            self._reset_reduction()

    def _segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(param index, start, end) of every parameter's part of flat [lo, hi)."""
        return [(i, max(lo, o), min(hi, o + p.numel())) for i, (p, o) in enumerate(zip(self.params, self.offsets))
                if max(lo, o) < min(hi, o + p.numel())]

    def _fused_pieces(self, segs, skip: list[bool]) -> dict:
        """For one bucket, by decay (True/False): the fused kernel's masters, exp_avgs and exp_avg_sqs,
        and where each piece's gradient sits, as (segment index, start, end). Segments are cut at
        multiples of _VEC (module docstring)."""
        groups = {}
        for s, (i, a, b) in enumerate(segs):
            for x, y in _split(a, b, _VEC):
                masters, exp_avgs, exp_avg_sqs, where = groups.setdefault(not skip[i], ([], [], [], []))
                masters.append(self.master[x - self.base:y - self.base])
                exp_avgs.append(self.exp_avg[x - self.base:y - self.base])
                exp_avg_sqs.append(self.exp_avg_sq[x - self.base:y - self.base])
                where.append((s, x - a, y - a))
        return groups

    # --- gradients -----------------------------------------------------------------------------

    def _device_grads(self, segs) -> list[torch.Tensor]:
        """The summed gradient of each segment where it is: views of the reduced shard (world > 1) or of
        p.grad (world 1); zeros for a parameter without gradient."""
        if self.grad is not None:
            return [self.grad[a - self.base:b - self.base] for _, a, b in segs]
        out = []
        for i, a, b in segs:
            g, off = self.params[i].grad, self.offsets[i]
            out.append(torch.zeros(b - a, device=self.flat.device) if g is None else g.reshape(-1)[a - off:b - off])
        return out

    def _grads(self, segs) -> list[torch.Tensor]:
        """The fp32 gradient of each segment where the update runs: the views themselves (fp32 on the
        same device), else copies (to host memory first with offload, so no fp32 copy of non-fp32
        gradients ever exists on the GPU)."""
        return [g.to(self.master.device).float() for g in self._device_grads(segs)]

    def _read_grads(self, lo: int, out: torch.Tensor, segs) -> None:
        """This rank's own gradients of flat [lo, lo + len(out)) into `out` (fp32; zeros where none)."""
        if sum(b - a for i, a, b in segs if self.params[i].grad is not None) < out.numel():
            out.zero_()  # padding, or parameters without a gradient
        for i, a, b in segs:
            g, off = self.params[i].grad, self.offsets[i]
            if g is not None:
                out[a - lo:b - lo].copy_(g.reshape(-1)[a - off:b - off])

    def _reset_reduction(self) -> None:
        self._ready = [False] * len(self.params)           # gradient complete in the last backward
        self._waiting = [len(segs) for segs in self._comm]  # parameters each bucket still waits for
        self._next = len(self._comm) - 1                    # the next bucket to start (last first)
        self._in_flight = []                                # (flat start, buffer, [(owner, start, end, work)])

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        """Runs after parameter i's gradient was accumulated (world > 1). In the last backward of a
        step (sync_grads) it starts, in order, the buckets whose gradients are now all there."""
        if self._touch[i][-1] > self._next:
            raise RuntimeError(f"{self.names[i]} got a gradient after it was reduced: set sync_grads only "
                               "for the last backward of a step, and call step() before the next")
        if self.sync_grads and not self._ready[i]:
            self._ready[i] = True
            for k in self._touch[i]:
                self._waiting[k] -= 1
            self._launch(in_backward=True)

    def _launch(self, in_backward: bool) -> None:
        """Start bucket reductions in order: in backward those whose gradients are complete, as long as
        fewer than _IN_FLIGHT are in flight (never waiting); in step() all the rest."""
        S, L = self.shard_numel, self.bucket
        while self._next >= 0 and (not in_backward or self._waiting[self._next] == 0):
            self._land(keep=_IN_FLIGHT if in_backward else _IN_FLIGHT - 1)
            if len(self._in_flight) >= _IN_FLIGHT:
                return
            k, self._next = self._next, self._next - 1
            lo, hi = k * L, min((k + 1) * L, self.world * S)
            buf = torch.empty(hi - lo, device=self.master.device)
            self._read_grads(lo, buf, self._comm[k])
            works = []
            for owner in range(lo // S, (hi - 1) // S + 1):     # the shards this bucket overlaps
                a, b = max(lo, owner * S), min(hi, (owner + 1) * S)
                works.append((owner, a, b, dist.reduce(buf[a - lo:b - lo], group_dst=owner, group=self._group,
                                                       async_op=True)))
            self._in_flight.append((lo, buf, works))

    def _land(self, keep: int) -> None:
        """Finish reductions oldest first: those already complete, and more (waiting) until at most `keep`
        are in flight. The owner copies its part of the sum into self.grad."""
        while self._in_flight and (len(self._in_flight) > keep or
                                   all(w.is_completed() for *_, w in self._in_flight[0][2])):
            lo, buf, works = self._in_flight.pop(0)
            for owner, a, b, work in works:
                work.wait()
                if owner == self.rank:
                    self.grad[a - self.base:b - self.base].copy_(buf[a - lo:b - lo])

    def _bucket_norms(self, segs) -> list[torch.Tensor]:
        # A function of its own, so that a bucket's gradient copies are gone before the next one's.
        return [n for (_, a, _), g in zip(segs, self._device_grads(segs)) for n in _piece_norms(g.float(), a)]

    def _grad_norm(self) -> float:
        """L2 norm of the summed gradient (before grad_scale): the pieces' norms in flat order, squared
        and added in float64."""
        norms = [n for segs in self.buckets for n in self._bucket_norms(segs)]
        norms = torch.cat(norms) if norms else self.flat.new_zeros(0, dtype=torch.float32)
        if self.world > 1:
            full = norms.new_zeros(self._n_norms)
            full[self._norm0:self._norm0 + norms.numel()] = norms
            dist.all_reduce(full, group=self._group)   # each piece has one owner: adds only zeros
            norms = full
        return math.sqrt(norms.double().square().sum().item())

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> float:
        """Sum gradients over ranks, scale, clip, update and gather the new weights.

        `grad_scale` multiplies the summed gradient first: pass 1/(global supervised-token count)
        for sum-reduced losses (and also 1/loss_scale with fp16). Returns the global gradient
        norm before clipping. If it is inf or nan nothing is updated (the step is skipped and
        not counted); the caller sees that in the returned value. The update scales the gradients
        it reads in place (with fp32 parameters on one rank: p.grad).
        """
        self._finish_reduction()
        norm = grad_scale * self._grad_norm()
        if not math.isfinite(norm):
            return norm
        scale = grad_scale
        if self.max_grad_norm and self.max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_'s coefficient, applied only when it shrinks.
            coef = self.max_grad_norm / (norm + 1e-6)
            if coef < 1.0:
                scale *= coef

        # torch.optim.AdamW(fused=True)'s kernel. Its `grad_scale` divides the gradient (and writes
        # the result back), so it gets 1/scale.
        self.step_count += 1
        self._step.fill_(self.step_count)
        inv = None if scale == 1.0 else torch.full((), 1.0 / scale, device=self.master.device)
        beta1, beta2 = self.betas
        for segs, groups in zip(self.buckets, self._pieces):
            grads = self._grads(segs)
            for decay, (masters, exp_avgs, exp_avg_sqs, where) in groups.items():
                torch._fused_adamw_(masters, [grads[s][x:y] for s, x, y in where], exp_avgs, exp_avg_sqs, [],
                                    [self._step] * len(masters), lr=self.lr, beta1=beta1, beta2=beta2,
                                    weight_decay=self.weight_decay if decay else 0.0, eps=self.eps,
                                    amsgrad=False, maximize=False, grad_scale=inv)
            del grads  # before the next bucket's copies exist
        self._sync_params()
        return norm

    def _finish_reduction(self) -> None:
        """Start and finish every gradient reduction of this step that is still due (world > 1)."""
        if self.world > 1:
            self._launch(in_backward=False)
            self._land(keep=0)
            self._reset_reduction()

    def discard(self) -> None:
        """Drop this step's gradients without updating anything (e.g. the loss was not finite). Collective
        with several ranks: the reductions started during backward are finished first, on every rank."""
        self._finish_reduction()
        self.zero_grad()

    @torch.no_grad()
    def all_finite(self) -> bool:
        """Whether the weights and the optimizer state (masters and moments) hold only finite numbers,
        on every rank. Collective with several ranks: each checks its shard (min and max, no copies)."""
        shard = self.flat[self.base:self.base + self.shard_numel]
        ok = all(math.isfinite(x) for t in (shard, self.master, self.exp_avg, self.exp_avg_sq)
                 for x in torch.aminmax(t))      # nan propagates into both
        if self.world > 1:
            bad = torch.tensor([0.0 if ok else 1.0], device=self.flat.device)
            dist.all_reduce(bad, group=self._group)
            ok = bad.item() == 0
        return ok

    def _sync_params(self) -> None:
        """Parameters <- masters: cast this shard into the flat buffer (unless it is the master), then
        gather all shards."""
        shard = self.flat[self.base:self.base + self.shard_numel]
        if shard.data_ptr() != self.master.data_ptr():
            shard.copy_(self.master)
        if self.world > 1:
            _all_gather(self.flat, shard, group=self._group)

    def zero_grad(self) -> None:
        """Drop the gradients (after step(), when a backward ran with sync_grads)."""
        if self.world > 1:
            if self._in_flight or self._next < len(self._comm) - 1:
                raise RuntimeError("zero_grad() while gradients are being reduced: call step() first")
            self._reset_reduction()
        for p in self.params:
            p.grad = None

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's shard (step, fp32 master, moments) plus the layout needed to re-partition, copied
        to host memory tensor by tensor: no device memory is allocated (from CUDA the driver stages
        the copy through its own pinned buffers), and later steps do not change it."""
        return {
            "step": self.step_count,
            **{name: torch.empty(t.shape, dtype=t.dtype).copy_(t)
               for name, t in (("master", self.master), ("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))},
            "layout": {
                "mode": "zero2",
                "names": list(self.names),
                "shapes": [list(p.shape) for p in self.params],
                "offsets": list(self.offsets),
                "numel": self.numel,
                "shard_numel": self.shard_numel,
                "n_shards": self.world,
                "shard_rank": self.rank,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a shard written by this same rank in the same layout. Collective."""
        layout = state["layout"]
        self._check_params(layout)
        if (layout["n_shards"], layout["shard_rank"]) != (self.world, self.rank):
            raise ValueError(
                f"state is shard {layout['shard_rank']} of {layout['n_shards']}, this optimizer "
                f"owns shard {self.rank} of {self.world}; use load_sharded()")
        self.load_sharded([state])

    def load_sharded(self, states: list) -> None:
        """Load the shards of all ranks of a checkpoint (dicts or paths to `torch.save` files),
        written by any number of ranks, re-partitioning them for this world.

        Collective: every rank calls it with the same list. Paths are memory-mapped, and only the
        slices that overlap this rank's shard are copied, straight into the optimizer's state.
        """
        by_shard = {}
        for s in states:
            if isinstance(s, (str, Path)):
                s = torch.load(s, map_location="cpu", mmap=True, weights_only=True)
            by_shard.setdefault(s["layout"]["shard_rank"], s)
        layout = next(iter(by_shard.values()))["layout"]
        self._check_params(layout)
        n_old, s_old = layout["n_shards"], layout["shard_numel"]
        if sorted(by_shard) != list(range(n_old)):
            raise ValueError(f"need shards 0..{n_old - 1}, got {sorted(by_shard)}")
        steps = {s["step"] for s in by_shard.values()}
        if len(steps) != 1:
            raise ValueError(f"shards disagree on the step count: {sorted(steps)}")

        start = self.base
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


def memory_plan(params: Iterable, world_size: int = 1, offload: bool = False) -> dict[str, int]:
    """Bytes per rank that `ZeroAdamW(params, offload=offload)` uses on the parameters' device with
    `world_size` ranks, from shapes and dtypes alone (meta parameters work), for the memory planner.
    With offload, masters and moments are in host memory (`host`), not counted on the device.

    - kept between steps: `master` (fp32 masters, only for non-fp32 parameters), `exp_avg`,
      `exp_avg_sq`, `grad_shard` (the reduced gradient, world > 1), `padding` (the flat buffer the
      parameters move into is padded to world_size x shard elements); `persistent` is their sum;
    - `init`: peak while constructing, beyond the parameters' own bytes (the flat buffer is a second
      copy of them until their old storage is freed; the state comes after);
    - transient, on top of `persistent` and the model's parameters and gradients: `backward` (buckets
      in flight in the last backward, world > 1), `step` (peak inside step(): at world size 1 the fp32
      copy of one bucket of non-fp32 gradients, else the reduction buckets; plus the grad-norm
      pieces), `save` (0: state_dict() copies straight to host memory);
    - `save_host`: host bytes of the state_dict() copy.
    """
    named = _trainable(params)
    numel = sum(p.numel() for _, p in named)
    dtype = named[0][1].dtype
    S = _shard_numel(numel, world_size)
    fp32 = 4 * S
    device_state = 0 if offload else fp32
    plan = {"master": 0 if dtype == torch.float32 or offload else fp32, "exp_avg": device_state,
            "exp_avg_sq": device_state, "grad_shard": fp32 if world_size > 1 else 0,
            "padding": (world_size * S - numel) * dtype.itemsize}
    plan["persistent"] = sum(plan.values())
    plan["host"] = 3 * fp32 if offload else 0
    plan["init"] = max(world_size * S * dtype.itemsize, plan["persistent"])
    # Norm pieces: 4 bytes each, plus the float64 copy and its square (20 in all); with several ranks
    # also the vector of all ranks' pieces.
    pieces, o = 0, 0
    for _, p in named:
        pieces, o = pieces + _n_pieces(o, o + p.numel()), o + p.numel()
    norms = 20 * pieces if world_size == 1 else 20 * (pieces // world_size + len(named)) + 4 * pieces
    bucket = 4 * min(_BUCKET, world_size * S)
    plan["backward"] = _IN_FLIGHT * bucket if world_size > 1 else 0
    if world_size > 1:
        plan["step"] = plan["backward"] + norms
    else:
        plan["step"] = (0 if dtype == torch.float32 else 4 * min(_BUCKET, numel)) + norms
    plan["save"] = 0
    plan["save_host"] = 3 * fp32
    return plan


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
        # the last update() overflowed with the scale already at min_scale: not the loss scale's doing
        self.stuck = False

    def update(self, grad_norm: float) -> bool:
        """Adjust the scale; returns True if the step overflowed (and so was skipped)."""
        if not self.enabled:
            return False
        if not math.isfinite(grad_norm):
            self.stuck = self.scale <= self.min_scale
            self.scale = max(self.scale / 2, self.min_scale)
            self.good_steps = 0
            return True
        self.stuck = False
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
