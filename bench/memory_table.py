"""README's "Will it fit?" table: the memory plan (phi3v.memory) of every mode on PERF.md's samples.

    python bench/memory_table.py            # markdown, a minute or two on a CPU

Micro-batch 1, bf16, one GPU, train.py's defaults otherwise (the recipe's LoRA targets, the optimizer
state in host memory for LoRA/QLoRA at the default batch of 64), full and no recomputation, and
full recomputation with the saved activations in host memory (`--offload_activations`).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v import memory  # noqa: E402

ROWS = [("full", False), ("full", True), ("lora", False), ("lora", True), ("qlora", False), ("qlora", True)]


def main() -> None:
    print("| mode | DocVQA, recompute full | DocVQA, none | UCF-101, full | UCF-101, none "
          "| DocVQA, full, `--offload_activations` |")
    print("|---|---|---|---|---|---|")
    for mode, frozen in ROWS:
        offload = memory.offload_optimizer("auto", mode, 64, 1, 1)
        plans = [(task, r, False) for task in ("docvqa", "ucf101") for r in ("full", "none")]
        plans.append(("docvqa", "full", True))
        peaks = [memory.estimate(mode, frozen, task, recompute=r, offload_optimizer=offload,
                                 offload_activations=act)["peak_gb"] for task, r, act in plans]
        cells = [f"{gb:.1f} GB" for gb in peaks]
        name = f"`--{mode}`" + (" `--freeze_vision`" if frozen else "")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
