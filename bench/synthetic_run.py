"""train.py itself on DocVQA-shaped synthetic data: its defaults, its loader, its step, timed.

    python bench/synthetic_run.py --out $OUT/run --mode lora            # GPU: real sizes, random weights
    python bench/synthetic_run.py --config tiny --out /tmp/syn --steps 2 # CPU smoke run

Writes a model (the real Phi-3.5-vision config, or the tiny one, random weights, with the demo's
tokenizer) and a converted DocVQA-layout dataset whose pages are 1680 x 1008 pixels, i.e. at
num_crops 16 a 3 x 5 grid + global = 16 real crops and 2353 image tokens (PERF.md's DocVQA shape),
then runs `train.py --task docvqa` on it with the train.py defaults of this machine (bf16, compile,
--recompute auto on CUDA) and reads samples/s and peak memory back from its metrics.jsonl. Prints
one JSON row (PERF.md's results schema, "source": "train.py").
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch                                  # noqa: E402
from PIL import Image                         # noqa: E402

from phi3v import Phi3VConfig, demo           # noqa: E402
from phi3v.schema import make_record, make_turn   # noqa: E402

PAGE = (1680, 1008)      # width x height: a 3 x 5 crop grid at num_crops 16
QUESTION = "What is the total amount due on this invoice?"


def write_data(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """OUT/docvqa_{train,val}.jsonl + OUT/images/: pages with random text-like stripes."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            rel = f"{split}/page{i:05d}.png"
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            page = torch.randint(180, 256, (PAGE[1] // 8, PAGE[0] // 8, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(page.numpy()).resize(PAGE, Image.Resampling.NEAREST).save(out / "images" / rel)
            answer = f"{int(torch.randint(10, 9999, (1,), generator=g))}.00"
            lines.append(json.dumps(make_record(f"{split}-{i:010d}", "docvqa", [make_turn([rel], QUESTION, answer)],
                                                answers=[answer])))
        (out / f"docvqa_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (model, data, train.py output)")
    p.add_argument("--config", choices=["real", "tiny"], default="real")
    p.add_argument("--mode", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--freeze_vision", action="store_true")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (the first ones include compilation)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--warmup_steps", type=int, default=4, help="steps left out of the timing")
    p.add_argument("--train_args", default="", help="more train.py flags, e.g. '--recompute full --no_compile'")
    a = p.parse_args(argv)
    cfg = Phi3VConfig() if a.config == "real" else Phi3VConfig.tiny()
    model_dir, data_dir, run_dir = a.out / "model", a.out / "data", a.out / "run"
    if not (model_dir / "config.json").exists():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        demo.write_base_model(model_dir, num_crops=16, config=cfg, dtype=torch.bfloat16, device=dev)
    n_train = a.steps * a.batch_size
    if not (data_dir / "docvqa_train.jsonl").exists():
        write_data(data_dir, n_train, 2)
    cmd = [sys.executable, str(REPO / "train.py"), "--task", "docvqa", "--data_dir", str(data_dir), "--model",
           str(model_dir), "--output_dir", str(run_dir), f"--{a.mode}", "--max_steps", str(a.steps),
           "--batch_size", str(a.batch_size), "--logging_steps", "1", "--max_eval_samples", "1",
           "--max_new_tokens", "4", "--no_tqdm"]
    cmd += (["--freeze_vision"] if a.freeze_vision else []) + a.train_args.split()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line] if r.returncode == 0 else []
    timed = recs[a.warmup_steps:] or recs[-1:]
    tok_s = statistics.median(x["tokens_per_s"] for x in timed) if timed else None
    per_sample = None
    if timed:   # train.py's tokens/s counts every position of the batch: divide by the actual length
        from phi3v import Processor
        from phi3v.data import JsonlDataset
        ds = JsonlDataset(data_dir / "docvqa_train.jsonl", Processor.from_pretrained(model_dir, num_crops=16))
        per_sample = statistics.mean(ds.lengths)
    plan = [line for line in r.stdout.splitlines() if line.startswith(("memory plan", "speed settings", "warning"))]
    row = {"impl": "phi3v", "mode": a.mode + ("_frozen_vision" if a.freeze_vision and a.mode == "full" else ""),
           "sample": "docvqa", "source": "train.py", "command": " ".join(cmd[1:]), "returncode": r.returncode,
           "config": {"train_py": plan, "steps": a.steps, "batch_size": a.batch_size, "timed_steps": len(timed)},
           "tokens": per_sample, "tokens_per_s": tok_s,
           "samples_per_s": tok_s / per_sample if tok_s and per_sample else None,
           "peak_mem_gb": max((x["peak_mem_gb"] for x in recs if "peak_mem_gb" in x), default=None), "wall_s": wall,
           "error": None if r.returncode == 0 else r.stderr.strip().splitlines()[-1:]}
    print(json.dumps(row))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
