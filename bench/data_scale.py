"""Training data at scale: index build (cold and cached), memory per record, sampler and loader speed.

    python bench/data_scale.py                          # N = 10k, 100k, 1M
    python bench/data_scale.py --n 200000 --workers 2 --micro_batches 200

Writes N LLaVA-like records (one image each, drawn from 32 JPEGs of varied sizes; a short question
and answer) into --workdir, then measures each step in a fresh process, and prints one JSON line per N:
- `cold_s`, `cold_records_per_s`: `JsonlDataset` with an empty index cache (a new process);
- `warm_s`: the same with the cache in place, in another new process (what every restart costs);
- `main_growth_mb` (and per record): the process's RSS growth over the dataset's construction
  (after gc), for the cold build and for the cached load;
- `worker_uss_mb`, `worker_rss_mb`: each DataLoader worker's private memory (Private_Clean +
  Private_Dirty of /proc/self/smaps_rollup) after a full gc.collect() in the worker, and its RSS,
  after `--micro_batches` micro-batches (the gc writes into every inherited object's header, so its
  copy-on-write pages become private: where a long run ends up);
- `sampler_ms_per_step`: StepSampler.micro_batches, mean over 200 steps of an epoch, and
  `sampler_epoch_permutation_ms`: the permutation drawn once per epoch;
- `loader_samples_per_s`: the DataLoader (train.py's: StepBatchSampler, collate, workers) over
  those micro-batches.
The tokenizer is the real Phi-3 one from ../shared/golden/phi3-tokenizer when present (as in the
figures of bench/README.md), else the demo's (`--tokenizer DIR` to choose).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("what is the color of the object in this image how many people are there describe scene briefly "
         "where was photo taken left right top bottom small large red blue green a an on under near").split()


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    """`root/train.jsonl` with n records + `root/images/` (32 JPEGs), unless already there."""
    from PIL import Image
    path = root / "train.jsonl"
    done = root / f".done-{n}"
    if done.exists():
        return path
    rng = random.Random(seed)
    (root / "images" / "coco").mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(32):
        w, h = rng.randint(200, 1400), rng.randint(200, 1400)
        names.append(f"coco/{k:03d}.jpg")
        Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(root / "images" / names[-1])
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "."
            rec = {"id": f"llava-{i:08d}", "source": "llava",
                   "conversations": [{"images": [rng.choice(names)], "user": q, "assistant": a}]}
            f.write(json.dumps(rec) + "\n")
    done.touch()
    return path


def memory(pid="self") -> dict:
    """RSS and USS (private clean + dirty) in MB from /proc/PID/smaps_rollup."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        kb[key] = int(rest.split()[0])
    return {"rss_mb": kb["Rss"] / 1e3, "uss_mb": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1e3}


class Probe:
    """A batch of this kind makes the worker that gets it report its memory after a full gc."""


def child(args) -> dict:
    """One measurement in this (fresh) process: build or load the index, then with --loader the
    sampler and the DataLoader."""
    import torch
    from phi3v import Processor
    from phi3v.data import JsonlDataset, StepBatchSampler, StepSampler, collate

    proc = Processor.from_pretrained(args.tokenizer, num_crops=args.num_crops)
    gc.collect()
    before = memory()["rss_mb"]
    t0 = time.perf_counter()
    ds = JsonlDataset(args.data, proc, cache_dir=args.cache)
    took = time.perf_counter() - t0
    gc.collect()
    out = {"s": took, "source": ds.index_source, "n": len(ds), "growth_mb": memory()["rss_mb"] - before}
    if not args.loader:
        return out
    sampler = StepSampler(ds.lengths, args.batch_size, args.micro_batch_size, seed=0)
    t0 = time.perf_counter()
    sampler.order(1)                                 # an epoch's permutation: once per epoch
    out["sampler_epoch_ms"] = (time.perf_counter() - t0) * 1e3
    steps = range(sampler.steps_per_epoch, sampler.steps_per_epoch + min(200, sampler.steps_per_epoch))
    t0 = time.perf_counter()
    for step in steps:                               # the steps of that epoch
        sampler.micro_batches(step)
    out["sampler_ms_per_step"] = (time.perf_counter() - t0) / len(steps) * 1e3

    class Probed(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            if isinstance(i, Probe):
                gc.collect()
                return {"probe": {"pid": os.getpid(), **memory()}}
            return ds[i]

    def batches():
        yield from list(StepBatchSampler(sampler, 0, sampler.steps_per_epoch))[:args.micro_batches]
        for _ in range(args.workers):                  # round-robin: one probe for each worker
            yield [Probe()]

    def collate_or_probe(samples):
        return samples[0] if "probe" in samples[0] else collate(samples, pad_id=proc.pad_token_id)

    loader = torch.utils.data.DataLoader(Probed(), batch_sampler=batches(), collate_fn=collate_or_probe,
                                         num_workers=args.workers, prefetch_factor=2 if args.workers else None)
    probes, n = [], 0
    t0 = time.perf_counter()
    for b in loader:
        if "probe" in b:
            probes.append(b["probe"])
        else:
            n += b["n_samples"]
            took = time.perf_counter() - t0
    out["loader_samples_per_s"] = n / took
    out["workers"] = probes
    return out


def run_child(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode:
        raise SystemExit(f"child {argv} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="10000,100000,1000000", help="comma list of record counts")
    ap.add_argument("--workdir", default="/tmp/phi3v-data-scale", help="where the data and caches go")
    ap.add_argument("--tokenizer", default=None, help="processor/tokenizer directory")
    ap.add_argument("--num_crops", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro_batches", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--micro_batch_size", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the generated data for the next run")
    # internal: one measurement in a fresh process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--loader", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.workdir)
    if args.tokenizer is None:
        golden = REPO.parent / "shared" / "golden" / "phi3-tokenizer"
        if golden.is_dir():
            args.tokenizer = str(golden)
        else:
            from phi3v import demo
            args.tokenizer = str(demo.write_base_model(work / "demo_model"))
    common = ["--tokenizer", args.tokenizer, "--num_crops", str(args.num_crops), "--workers", str(args.workers),
              "--micro_batches", str(args.micro_batches), "--batch_size", str(args.batch_size),
              "--micro_batch_size", str(args.micro_batch_size)]
    for n in [int(x) for x in args.n.split(",")]:
        data = write_data(work / f"n{n}", n)
        cache = work / f"n{n}" / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        cold = run_child(common + ["--data", str(data), "--cache", str(cache)])
        warm = run_child(common + ["--data", str(data), "--cache", str(cache), "--loader"])
        assert cold["source"] == "built" and warm["source"] == "cache", (cold, warm)
        row = {"records": n, "cold_s": round(cold["s"], 2), "cold_records_per_s": round(n / cold["s"]),
               "warm_s": round(warm["s"], 3),
               "main_growth_mb": {"cold": round(cold["growth_mb"], 1), "warm": round(warm["growth_mb"], 1)},
               "main_growth_bytes_per_record": {"cold": round(cold["growth_mb"] * 1e6 / n, 1),
                                                "warm": round(warm["growth_mb"] * 1e6 / n, 1)},
               "worker_uss_mb": [round(w["uss_mb"], 1) for w in warm["workers"]],
               "worker_rss_mb": [round(w["rss_mb"], 1) for w in warm["workers"]],
               "sampler_ms_per_step": round(warm["sampler_ms_per_step"], 3),
               "sampler_epoch_permutation_ms": round(warm["sampler_epoch_ms"], 1),
               "loader_samples_per_s": round(warm["loader_samples_per_s"], 1),
               "tokenizer": Path(args.tokenizer).name, "cpus": os.cpu_count()}
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work / f"n{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
