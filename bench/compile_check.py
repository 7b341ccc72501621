"""Is train.py's micro-step fit for the GPU? Graph breaks, host syncs, recompiles, compiled == eager.

    python bench/compile_check.py                         # LoRA, QLoRA, full on the tiny model, CPU
    python bench/compile_check.py --modes lora --recompute selective
    python bench/compile_check.py --modes lora --offload_activations   # every saved tensor via the host

One JSON line per mode, for the tiny model on CPU (inductor), with the step train.py runs
(`Phi3V.training_loss` on a collated micro-batch, then backward):
  graph_breaks   torch._dynamo.explain over the whole training forward (0: it traces as one graph
                 per region, so every compiled layer runs fullgraph; with --offload_activations the
                 forward inside the hooks, which are entered in eager code)
  host_syncs     ops during forward + backward that make a GPU wait for a value (item/`int(t)`,
                 nonzero, boolean-mask indexing, unique, ...), counted by a dispatch mode
  graphs         graphs compiled for the first micro-batch; recompiles: graphs added by 4 more
                 micro-batches of other lengths and image layouts (recompute.py says what to expect)
  max_abs_diff   compiled vs eager (same weights): largest difference of the loss and of every
                 trainable parameter's gradient over the 5 micro-batches, both per supervised
                 token (what the optimizer uses: train.py divides by the token count)
Exit status 1 if any mode has a graph break or host sync, a recompile, or max_abs_diff > 1e-5.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:      # `python bench/compile_check.py` from a checkout
    sys.path.insert(0, str(REPO))

import torch                                                      # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode        # noqa: E402

from phi3v import Phi3V, Phi3VConfig                              # noqa: E402
from phi3v import recompute as recompute_module                   # noqa: E402
from phi3v.config import CROP, crop_grid_tokens                   # noqa: E402
from phi3v.data import training_inputs                            # noqa: E402
from phi3v.finetune import MODES, prepare                         # noqa: E402

_aten = torch.ops.aten
# ops that copy a device value to the host (the GPU stream must drain first)
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
            _aten.is_nonzero.default, _aten.equal.default, _aten.repeat_interleave.Tensor,
            _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default}
LAYOUTS = [(40, [(1, 2)]), (57, [(2, 1)]), (33, [(1, 1), (1, 2)]), (71, [(1, 1)]), (48, [(2, 2)])]


class SyncCounter(TorchDispatchMode):
    """Counts ops that would read a device value on the host (boolean-mask indexing included)."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if func in SYNC_OPS or bool_index:
            self.found[str(func)] = self.found.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def micro_batch(cfg: Phi3VConfig, n_text: int, crops: list[tuple[int, int]], seed: int) -> dict:
    """A collated one-sample micro-batch: text, images of the given crop grids, a 5-token answer."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(2, 300, (4,), generator=g)]
    for k, (h, w) in enumerate(crops):
        parts.append(torch.full((crop_grid_tokens(h, w, cfg.vision.grid // 2),), -(k + 1)))
    parts.append(torch.randint(2, 300, (n_text,), generator=g))
    ids = torch.cat(parts)[None]
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]
    sizes = torch.tensor([[h * CROP, w * CROP] for h, w in crops]) if crops else None
    batch = training_inputs(ids, torch.zeros_like(ids), labels, sizes)
    n_crops = 1 + max((h * w for h, w in crops), default=0)       # global + sub-crops, zero padded
    batch["pixel_values"] = torch.randn(len(crops), n_crops, 3, CROP, CROP, generator=g) if crops else None
    return batch


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def check(mode: str, recompute: str, offload: bool = False, seed: int = 0) -> dict:
    torch._dynamo.reset()
    cfg = Phi3VConfig.tiny()
    eager = prepare(Phi3V.from_config(cfg, seed=seed), mode, seed=seed)
    compiled = copy.deepcopy(eager)
    eager.configure_training(recompute=recompute, compile=False, offload_activations=offload)
    compiled.configure_training(recompute=recompute, compile=True, offload_activations=offload)
    eager.train(), compiled.train()
    batches = [micro_batch(cfg, n, crops, seed + i) for i, (n, crops) in enumerate(LAYOUTS)]

    # offload's saved-tensor hooks are entered in eager code around the compiled layers (never traced):
    # explain the forward inside them
    eager.offload_activations = False
    explain = torch._dynamo.explain(eager.training_loss)(batches[0])
    eager.offload_activations = offload
    counter = SyncCounter()
    with counter:
        eager.training_loss(batches[0]).backward()
    eager.zero_grad()

    diff, graphs, t0 = 0.0, [], time.perf_counter()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for b in batches:
        # per supervised token, as the optimizer sees them (train.py scales by 1 / token count)
        n = b["targets"].numel()
        loss_c = compiled.training_loss(b) / n
        loss_c.backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        loss_e = eager.training_loss(b) / n
        loss_e.backward()
        ge, gc = grads(eager), grads(compiled)
        assert ge.keys() == gc.keys() and ge, "the same parameters must get gradients"
        diff = max(diff, (loss_c - loss_e).abs().item(), *((ge[k] - gc[k]).abs().max().item() for k in ge))
        eager.zero_grad(), compiled.zero_grad()
    return {"mode": mode, "recompute": recompute, "offload_activations": offload,
            "graph_breaks": explain.graph_break_count,
            "break_reasons": [str(r.reason) for r in explain.break_reasons][:5],
            "host_syncs": sum(counter.found.values()), "sync_ops": counter.found,
            "graphs": graphs[0], "recompiles": graphs[-1] - graphs[0], "micro_batches": len(batches),
            "tokens": [int(b["input_ids"].shape[1]) for b in batches], "max_abs_diff": diff,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    p.add_argument("--offload_activations", action="store_true",
                   help="saved tensors via host memory, all of them (the tiny model's are under the size limit)")
    a = p.parse_args(argv)
    if a.offload_activations:
        recompute_module.MIN_OFFLOAD_BYTES = 0
    torch.manual_seed(0)
    ok = True
    for mode in a.modes.split(","):
        r = check(mode, a.recompute, a.offload_activations)
        print(json.dumps(r), flush=True)
        ok &= r["graph_breaks"] == 0 and r["host_syncs"] == 0 and r["recompiles"] == 0 and r["max_abs_diff"] <= 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
