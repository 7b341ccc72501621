"""Memory plan: the peak GPU memory of a training step, predicted on the CPU in seconds.

    python -m phi3v.memory --mode lora --task docvqa --recompute full --bf16 --json

The model is built on the meta device (shapes, no data), set up exactly as train.py does
(`finetune.prepare`, `Phi3V.configure_training`) and runs train.py's micro-step
(`Phi3V.training_loss` + backward) twice, as gradient accumulation does, under a tracker of live
storages. Parameters, gradients and the optimizer's state for this world size are added
(`optim.memory_plan`), and the optimizer's construction, its step and a checkpoint save are
accounted too. Figures are decimal GB (bytes / 1e9), the
unit of `torch.cuda.max_memory_allocated() / 1e9` that bench/ reports. Every allocation is rounded
up to 512 bytes, as the CUDA caching allocator does. Attention on meta tensors runs the kernel a GPU
runs (flash, or memory-efficient with a mask: model.attention), not the math fallback.

What it does not see: memory outside the caching allocator (CUDA context, NCCL buffers) and the
allocator's fragmentation; the GPU figure (bench/train_step.py reports both) says how close it is.
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import cli
from .config import CROP, Phi3VConfig, crop_grid_tokens
from .data import to_device, training_inputs
from .finetune import MODES, prepare
from .model import Phi3V
from .optim import memory_plan as optimizer_memory_plan

GB = 1e9
BLOCK = 512        # the CUDA caching allocator's size granularity

# PERF.md's samples: (images, (crop rows, crop cols) per image, num_crops, text tokens, answer tokens)
TASK_SAMPLES = {
    "docvqa": (1, (3, 5), 16, 90, 8),        # one page at num_crops 16: 2353 image + 90 text = 2443 tokens
    "hateful_memes": (1, (3, 5), 16, 90, 8),
    "nlvr2": (2, (3, 5), 16, 60, 4),
    "ucf101": (8, (2, 2), 4, 60, 4),         # 8 frames at num_crops 4: 8 x 757 + 60 = 6116 tokens
}


def offload_optimizer(setting: str, mode: str, batch_size: int, micro_batch_size: int,
                      world_size: int) -> bool:
    """Whether `--offload_optimizer {auto,on,off}` keeps the optimizer state in host memory. auto: for
    LoRA/QLoRA that accumulate at least 32 micro-batches per optimizer step on each rank. The
    host-side update and the two copies then cost a few per cent of a step, and 12 bytes per
    trainable parameter leave the GPU (for rank 64 on the LM linears 1.2 GB); with fewer
    micro-batches, or full fine-tuning, the cost is not small."""
    if setting != "auto":
        return setting == "on"
    return mode in ("lora", "qlora") and batch_size // (micro_batch_size * world_size) >= 32


def largest_grid(num_crops: int) -> tuple[int, int]:
    """The crop grid with the most image tokens that `num_crops` allows (the worst case)."""
    return max(((h, w) for h in range(1, num_crops + 1) for w in range(1, num_crops // h + 1)),
               key=lambda hw: crop_grid_tokens(*hw))


def sample_batch(cfg: Phi3VConfig, task: str = "docvqa", num_crops: int | None = None, tokens: int | None = None,
                 micro_batch_size: int = 1, seed: int = 0) -> dict:
    """A collated micro-batch of `micro_batch_size` equal samples shaped like the task's (PERF.md):
    its images (with `num_crops`: each at the largest grid that many crops allow), its text, a short
    supervised answer; `tokens` sets the total length (text fills what the images leave). Like the
    processor's output, each image has num_crops + 1 crops (the unused ones zero); values are random.
    Also `n_targets`, and `n_images`, `real_crops`, `image_tokens` per sample (for bench/)."""
    if task not in TASK_SAMPLES:
        raise ValueError(f"task must be one of {sorted(TASK_SAMPLES)}, got {task!r}")
    n_img, grid, crops_default, n_text, n_answer = TASK_SAMPLES[task]
    if num_crops is not None:
        grid = largest_grid(num_crops)
    per_img = crop_grid_tokens(*grid, cfg.vision.grid // 2)
    if tokens is not None:
        if tokens < n_img * per_img + n_answer + 5:
            raise ValueError(f"--tokens {tokens} is shorter than the task's {n_img} image(s) of {per_img} tokens")
        n_text = tokens - n_img * per_img
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 32000, (n_text,), generator=g)
    text[0] = cfg.bos_token_id
    # <s><|user|>\n ..., then image k's placeholder run (ids -k), then the rest of the text
    parts = [text[:4]] + [torch.full((per_img,), -(k + 1)) for k in range(n_img)] + [text[4:]]
    ids = torch.cat(parts)[None].expand(micro_batch_size, -1).contiguous()       # [B, T]
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]                                   # the answer is supervised
    n = n_img * micro_batch_size
    sizes = torch.tensor([[grid[0] * CROP, grid[1] * CROP]] * n)
    # rows are separate samples of equal length: plain causal attention, as the collator gives
    batch = training_inputs(ids, torch.zeros_like(ids), labels, sizes, causal=True)
    pixels = torch.zeros(n, 1 + (num_crops or crops_default), 3, CROP, CROP)
    pixels[:, :1 + grid[0] * grid[1]].normal_(generator=g)
    return {**batch, "labels": labels, "pixel_values": pixels, "image_sizes": sizes,
            "n_targets": int(batch["targets"].numel()), "n_images": n_img,
            "real_crops": n_img * (1 + grid[0] * grid[1]), "image_tokens": n_img * per_img}


class LiveBytes(TorchDispatchMode):
    """A timeline of the storages that ops create while active: each allocation (rounded up to the
    allocator's 512-byte blocks) and its release when the last tensor using it dies (views share a
    storage). Storages that existed before (weights, the batch) are not counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = 0
        self.events: list[tuple[int, int]] = []          # (storage key, +bytes / -bytes)
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for t in existing:
            self._keys.setdefault(t.untyped_storage(), None)

    def key(self, t: torch.Tensor) -> int | None:
        return self._keys.get(t.untyped_storage())

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st in self._keys:
            return
        k, n = len(self.events), -(-st.nbytes() // BLOCK) * BLOCK
        self._keys[st] = k
        self.live += n
        self.events.append((k, n))
        weakref.finalize(st, self._free, k, n)

    def _free(self, k: int, n: int) -> None:
        self.live -= n
        self.events.append((k, -n))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._add(t)
        return out

    def peak(self, leave_out: set[int] = frozenset()) -> int:
        """The largest live total over the timeline, not counting the storages `leave_out`."""
        live = top = 0
        for k, n in self.events:
            if k not in leave_out:
                live += n
                top = max(top, live)
        return top


def nbytes(tensors) -> int:
    """Bytes of distinct storages, rounded as the allocator does."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += -(-st.nbytes() // BLOCK) * BLOCK
    return total


def estimate(mode: str = "lora", freeze_vision: bool = False, task: str = "docvqa", num_crops: int | None = None,
             tokens: int | None = None, micro_batch_size: int = 1, recompute: str = "full", world_size: int = 1,
             dtype: torch.dtype = torch.bfloat16, config: Phi3VConfig | None = None, lora_rank: int = 64,
             lora_targets: list[str] | None = None, batch: dict | None = None, device: str = "meta",
             offload_optimizer: bool = False, offload_activations: bool = False) -> dict:
    """Predicted peak (decimal GB) of a training step of `mode` on one rank, with its breakdown:
    weights (frozen parameters and buffers), trainable_params, gradients, optimizer_state (this
    rank's shard), activations (held for backward at the end of the forward), transient (the rest of
    the peak: recomputation, logits chunks, backward temporaries). `batch`: a collated micro-batch
    to plan for instead of the task's sample (train.py passes its longest). `device="cpu"` runs the
    same step with real (random) tensors instead: the measurement the plan is tested against.
    `offload_optimizer`, `offload_activations`: what train.py's options of those names keep in host
    memory (the optimizer's state; what autograd saves for backward, weights excepted)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if world_size < 1 or micro_batch_size < 1:
        raise ValueError(f"world_size and micro_batch_size must be >= 1, got {world_size}, {micro_batch_size}")
    cfg = config or Phi3VConfig()
    if device == "meta":
        with torch.device("meta"):
            model = Phi3V(cfg).to(dtype)
    else:
        model = Phi3V.from_config(cfg, dtype=dtype, device=device)
    prepare(model, mode, freeze_vision=freeze_vision, lora_rank=lora_rank, lora_alpha=2 * lora_rank,
            targets=lora_targets)
    model.configure_training(recompute=recompute, offload_activations=offload_activations)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [t for t in list(model.parameters()) + list(model.buffers()) if not t.requires_grad]
    if batch is None:
        batch = sample_batch(cfg, task, num_crops, tokens, micro_batch_size)
    batch = to_device(batch, torch.device(device))
    opt = optimizer_memory_plan(trainable, world_size, offload_optimizer)   # ZeroAdamW's accounting, from shapes

    weights, params = nbytes(frozen), nbytes(trainable)
    tracker = LiveBytes(existing=frozen + trainable + [v for v in batch.values() if torch.is_tensor(v)])
    with tracker:
        loss = model.training_loss(batch)
        activations = tracker.live                       # what the forward keeps for backward
        loss.backward()
        del loss
    grads = nbytes(p.grad for p in trainable)
    grad_keys = {tracker.key(p.grad) for p in trainable}
    # micro-step 1 creates the gradients during backward; every later micro-step of an accumulation
    # runs with all of them already there: its peak is the step's other memory + all gradients
    during_step = max(tracker.peak() - grads, tracker.peak(leave_out=grad_keys))
    persistent = weights + params + grads + opt["persistent"]
    phases = {"optimizer_init": weights + params + opt["init"],
              "micro_step": persistent + during_step + opt["backward"],
              "optimizer_step": persistent + opt["step"],
              "checkpoint_save": persistent + opt["save"]}
    peak = max(phases.values())
    activations = min(activations, during_step) if phases["micro_step"] == peak else 0
    breakdown = {"weights": weights, "trainable_params": params, "gradients": grads,
                 "optimizer_state": opt["persistent"], "activations": activations,
                 "transient": peak - persistent - activations}
    return {"peak_gb": peak / GB, "breakdown": {k: v / GB for k, v in breakdown.items()},
            "phases": {k: v / GB for k, v in phases.items()}, "peak_phase": max(phases, key=phases.get),
            "config": {"mode": mode, "freeze_vision": freeze_vision, "task": task, "num_crops": num_crops,
                       "tokens": int(batch["input_ids"].shape[1]), "micro_batch_size": int(batch["input_ids"].shape[0]),
                       "recompute": recompute, "world_size": world_size, "dtype": str(dtype).replace("torch.", ""),
                       "offload_optimizer": offload_optimizer, "host_optimizer_gb": opt["host"] / GB,
                       "offload_activations": offload_activations,
                       "trainable_params": sum(p.numel() for p in trainable)}}


def advise(budget_gb: float, batch_for=None, **kw) -> str | None:
    """The cheapest single change to `estimate(**kw)`'s configuration that the plan fits into
    `budget_gb`, as a flag to use ("--recompute full (9.87 GB)"), or None. Tried in this order, from
    the least to the most training speed (or adaptation capacity) given up: more recomputation, a
    smaller micro-batch (`batch_for(n)` builds one of n samples), the optimizer state in host memory,
    the saved activations in host memory, QLoRA instead of LoRA, LoRA instead of full fine-tuning, a
    frozen vision tower."""
    order = {"none": ["selective", "full"], "selective": ["full"], "full": []}[kw.get("recompute", "full")]
    tries = [(f"--recompute {r}", {"recompute": r}) for r in order]
    micro = kw.get("micro_batch_size", 1) if batch_for is None else int(kw["batch"]["input_ids"].shape[0])
    while micro > 1:
        micro //= 2
        tries.append((f"--micro_batch_size {micro}", {"micro_batch_size": micro} if batch_for is None
                      else {"batch": batch_for(micro)}))
    if not kw.get("offload_optimizer"):
        tries.append(("--offload_optimizer on", {"offload_optimizer": True}))
    if not kw.get("offload_activations"):
        tries.append(("--offload_activations", {"offload_activations": True}))
    mode = kw.get("mode", "lora")
    if mode in ("lora", "full"):
        tries.append(("--qlora", {"mode": "qlora"}) if mode == "lora" else ("--lora", {"mode": "lora"}))
    if not kw.get("freeze_vision"):
        tries.append(("--freeze_vision", {"freeze_vision": True}))
    for flag, change in tries:
        plan = estimate(**{**kw, **change})
        if plan["peak_gb"] <= budget_gb:
            return f"{flag} ({plan['peak_gb']:.2f} GB)"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with every value range-checked and no flag that the plan would ignore:
    such a flag is an error (one line, exit 2) that says why and what to use instead."""
    p = cli.ArgumentParser(prog="phi3v.memory", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="lora")
    p.add_argument("--freeze_vision", action="store_true", help="freeze CLIP, separators and projector")
    p.add_argument("--task", choices=sorted(TASK_SAMPLES), default="docvqa", help="sample shape (PERF.md's)")
    p.add_argument("--num_crops", type=cli.positive_int, help="each image at the largest grid of this many crops")
    p.add_argument("--tokens", type=cli.positive_int, help="total tokens per sample (text fills what the images leave)")
    p.add_argument("--micro_batch_size", type=cli.positive_int, default=1)
    p.add_argument("--batch_size", type=cli.positive_int, default=None,
                   help="global batch (default 64): decides --offload_optimizer auto for LoRA/QLoRA")
    p.add_argument("--offload_optimizer", choices=["auto", "on", "off"], default="auto",
                   help="optimizer state in host memory (auto: LoRA/QLoRA with >= 32 micro-batches per step)")
    p.add_argument("--offload_activations", action="store_true",
                   help="what autograd saves for backward (weights excepted) in host memory until backward")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    p.add_argument("--world_size", type=cli.positive_int, default=1)
    p.add_argument("--lora_rank", type=cli.positive_int, default=None, help="LoRA/QLoRA rank (default 64)")
    prec = p.add_mutually_exclusive_group()
    for name in ("bf16", "fp16", "fp32"):
        prec.add_argument(f"--{name}", dest="dtype", action="store_const", const=name)
    p.add_argument("--gpu_memory", type=cli.positive_float,
                   help="GB the GPU has: say whether it fits, else the cheapest change")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.lora_rank is not None and a.mode == "full":
        p.error("--lora_rank applies to --mode lora/qlora; --mode full trains every weight and has no rank")
    if a.batch_size is not None and (a.offload_optimizer != "auto" or a.mode == "full"):
        p.error("--batch_size only decides --offload_optimizer auto for LoRA/QLoRA, which "
                + (f"--offload_optimizer {a.offload_optimizer} overrides" if a.offload_optimizer != "auto"
                   else "--mode full never uses") + "; drop --batch_size (the plan is per micro-batch)")
    a.lora_rank = 64 if a.lora_rank is None else a.lora_rank
    a.batch_size = 64 if a.batch_size is None else a.batch_size
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or "bf16"]
    offload = offload_optimizer(a.offload_optimizer, a.mode, a.batch_size, a.micro_batch_size, a.world_size)
    try:
        plan = estimate(a.mode, a.freeze_vision, a.task, a.num_crops, a.tokens, a.micro_batch_size, a.recompute,
                        a.world_size, dtype, lora_rank=a.lora_rank, offload_optimizer=offload,
                        offload_activations=a.offload_activations)
        if a.gpu_memory is not None:
            plan["fits"] = plan["peak_gb"] <= a.gpu_memory
            plan["advice"] = None if plan["fits"] else advise(
                a.gpu_memory, mode=a.mode, freeze_vision=a.freeze_vision, task=a.task, num_crops=a.num_crops,
                tokens=a.tokens, micro_batch_size=a.micro_batch_size, recompute=a.recompute,
                world_size=a.world_size, dtype=dtype, lora_rank=a.lora_rank, offload_optimizer=offload,
                offload_activations=a.offload_activations)
    except ValueError as e:
        sys.stderr.write(f"phi3v.memory: error: {cli.message(e)}\n")
        return 2
    if a.json:
        print(json.dumps(plan))
        return 0
    c = plan["config"]
    print(f"{c['mode']}{' (vision frozen)' if c['freeze_vision'] else ''}, {c['task']}: {c['micro_batch_size']} x "
          f"{c['tokens']} tokens, recompute {c['recompute']}, {c['dtype']}, world size {c['world_size']}"
          + (f", optimizer state in host memory ({c['host_optimizer_gb']:.2f} GB)" if c["offload_optimizer"] else "")
          + (", saved activations in host memory" if c["offload_activations"] else ""))
    for k, v in plan["breakdown"].items():
        print(f"  {k:18} {v:8.2f} GB")
    print(f"  {'peak':18} {plan['peak_gb']:8.2f} GB   (during the {plan['peak_phase'].replace('_', ' ')})")
    if "fits" in plan:
        print(f"fits in {a.gpu_memory:g} GB" if plan["fits"] else f"does not fit in {a.gpu_memory:g} GB: "
              + (f"the cheapest change that fits is {plan['advice']}" if plan["advice"] else "no single change fits"))
    return 0


if __name__ == "__main__":
    with cli.errors("phi3v.memory"):
        sys.exit(main())
