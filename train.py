"""Fine-tune Phi-3.5-vision: full, frozen-vision, LoRA or QLoRA; one process or torchrun.

    python train.py --task demo                                   # offline, CPU, a few minutes
    torchrun --nproc_per_node=4 train.py --task ucf101 --data_dir DIR --lora --bf16

The loop is written out in order: config -> distributed init -> processor/model -> quantise/LoRA ->
data -> optimizer -> resume -> eval before -> (micro-steps, optimizer step, log, checkpoint)* ->
eval after -> export. Everything it calls is a plain function below or a module of phi3v/.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from phi3v import Phi3V, Processor, cli, dist, memory
from phi3v.checkpoint import (complete_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                              verify_checkpoint)
from phi3v.data import JsonlDataset, StepBatchSampler, StepSampler, collate, to_device
from phi3v.evaluate import evaluate, load_eval_records, write_predictions
from phi3v.finetune import prepare
from phi3v.jsonfile import write_atomic, write_text_atomic
from phi3v.lora import load_adapter, merge_lora, save_adapter
from phi3v.optim import DynamicLossScaler, ZeroAdamW, lr_at, no_decay


class Task(NamedTuple):
    train: str | None       # jsonl names inside --data_dir (the converters' names)
    eval: str | None
    num_crops: int
    anls: bool              # DocVQA is also scored by ANLS


TASKS = {
    "ucf101": Task("ucf101_train.jsonl", "ucf101_val.jsonl", 4, False),
    "docvqa": Task("docvqa_train.jsonl", "docvqa_val.jsonl", 16, True),
    "hateful_memes": Task("hateful_memes_train.jsonl", "hateful_memes_val.jsonl", 16, False),
    "nlvr2": Task("nlvr2_train.jsonl", "nlvr2_val.jsonl", 16, False),
    "jsonl": Task(None, None, 4, False),
    "demo": Task("ucf101_train.jsonl", "ucf101_val.jsonl", 1, False),
}
# the demo's defaults where the user did not set the flag (a tiny model on a CPU in a few minutes)
DEMO_DEFAULTS = {"batch_size": 8, "warmup_steps": 4, "num_train_epochs": 4.0, "logging_steps": 2,
                 "max_new_tokens": 8, "eval_batch_size": 4, "num_workers": 1, "micro_batch_size": 2,
                 "lora_rank": 16}


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(default="demo", metadata={"help": "preset: " + ", ".join(TASKS), "choices": list(TASKS)})
    data_dir: str | None = field(default=None, metadata={"help": "converted dataset folder (jsonl + images/)"})
    train_file: str | None = field(default=None, metadata={"help": "jsonl for --task jsonl (images/ beside it)"})
    eval_file: str | None = field(default=None, metadata={"help": "eval jsonl (default: the preset's val split)"})
    output_dir: str | None = field(default=None, metadata={"help": "default ./output/<task>"})
    model: str = field(default="microsoft/Phi-3.5-vision-instruct",
                       metadata={"help": "HF-layout dir or hub id", "aliases": ["--model_name_or_path"]})
    adapter: str | None = field(default=None, metadata={"help": "peft adapter to start from / evaluate"})
    mode: str | None = field(default=None, metadata={"help": "set by --lora / --qlora / --full"})
    freeze_vision: bool = field(default=False, metadata={
        "help": "freeze CLIP, projector and separators", "aliases": ["--freeze_vision_model", "--freeze_image_model"]})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and compute (default on CUDA where supported)"})
    fp16: bool = field(default=False, metadata={"help": "fp16 compute with dynamic loss scaling"})
    fp32: bool = field(default=False, metadata={"help": "fp32 weights and compute (default on CPU)"})
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile the decoder blocks, CLIP layers and projector (default: on for CUDA, off on CPU)"})
    recompute: str | None = field(default=None, metadata={
        "help": "activation recomputation: auto (CUDA default: the fastest that the memory plan fits), none, "
                "selective, full (CPU default)", "choices": ["auto", "none", "selective", "full"]})
    tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on CUDA (--no_tf32 turns them off)"})
    offload_optimizer: str = field(default="auto", metadata={
        "help": "optimizer state (fp32 masters, moments) in host memory, updated on the CPU; auto: on for "
                "LoRA/QLoRA with >= 32 micro-batches per optimizer step and rank", "choices": ["auto", "on", "off"]})
    offload_activations: bool = field(default=False, metadata={
        "help": "what autograd saves for backward (with --recompute full: each layer's input), weights "
                "excepted, in host memory until backward: about 1 GB less GPU memory per DocVQA sample, "
                "a copy each way over PCIe"})
    batch_size: int = field(default=64, metadata={"help": "global batch (samples per optimizer step)"})
    micro_batch_size: int = field(default=1, metadata={"help": "samples per forward on one GPU",
                                                       "aliases": ["--batch_size_per_gpu"]})
    max_length: int | None = field(default=None, metadata={"help": "drop (never truncate) longer samples"})
    learning_rate: float | None = field(default=None, metadata={"help": "default 2e-4 (LoRA/QLoRA), 4e-5 (full)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay (not biases/norms)",
                                                         "aliases": ["--wd"]})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (ignored with --max_steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    lr_schedule: str = field(default="linear", metadata={"help": "linear or cosine decay",
                                                          "choices": ["linear", "cosine"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient norm clip (0: none)"})
    num_crops: int | None = field(default=None, metadata={"help": "HD crops per image (preset default)"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)"})
    lora_alpha_ratio: float | None = field(default=None, metadata={"help": "alpha = round(rank x ratio)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    packing: bool = field(default=False, metadata={"help": "pack each micro-batch into one padding-free row"})
    drop_too_long: bool = field(default=True, metadata={"help": "drop samples over --max_length (else error)"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip and count malformed records"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept"})
    resume: str | None = field(default=None, metadata={"help": "resume from DIR or (no value) the newest checkpoint",
                                                       "nargs": "?", "const": "latest"})
    eval_only: bool = field(default=False, metadata={"help": "only evaluate --model (+ --adapter)"})
    eval_batch_size: int = field(default=1, metadata={"help": "prompts per generate call"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N records"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length at evaluation"})
    merge: bool = field(default=False, metadata={"help": "also write a merged HF-layout model"})
    seed: int = field(default=42, metadata={"help": "seed for init, sampling and dropout"})
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    num_workers: int = field(default=2, metadata={"help": "data-loader worker processes"})
    tqdm: bool = field(default=True, metadata={"help": "progress bars (--no_tqdm / --no-tqdm)"})
    use_flash_attention: bool = field(default=False, metadata={"help": "recipe alias: implies --bf16"})

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()


def parse_args(argv=None) -> TrainConfig:
    """One `--snake_case` flag per TrainConfig field (type from the annotation), the recipe's aliases,
    then `resolve`. Errors are one line `train.py: error: ...` and exit 2."""
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])

    def error(msg):  # one line, no usage dump
        sys.stderr.write(f"train.py: error: {msg}\n")
        sys.exit(2)
    p.error = error
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--lora", "--use_lora", dest="mode", action="store_const", const="lora", help="LoRA")
    modes.add_argument("--qlora", "--use_qlora", dest="mode", action="store_const", const="qlora",
                       help="QLoRA: NF4 base + LoRA")
    modes.add_argument("--full", "--full_train", dest="mode", action="store_const", const="full",
                       help="full fine-tuning (ZeRO-2)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "mode":
            continue
        names = [f"--{f.name}"] + f.metadata.get("aliases", [])
        kw = {"help": f.metadata.get("help", ""), "dest": f.name, "default": f.default}
        if f.type in ("bool", bool, "bool | None"):
            if f.name in ("tqdm", "compile", "tf32"):     # --x / --no_x (and the recipe's --no-tqdm)
                p.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=f.default, help=kw["help"])
                p.add_argument(f"--no_{f.name}", f"--no-{f.name}", dest=f.name, action="store_false")
            elif f.default:
                p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            else:
                p.add_argument(*names, action="store_true", **kw)
            continue
        base = f.type.split(" | ")[0] if isinstance(f.type, str) else f.type
        kw["type"] = {"int": int, "float": float, "str": str}.get(base, str)
        for k in ("choices", "nargs", "const"):
            if k in f.metadata:
                kw[k] = f.metadata[k]
        p.add_argument(*names, **kw)
    a = p.parse_args(argv)
    return resolve(TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)}), error)


def resolve(cfg: TrainConfig, error) -> TrainConfig:
    """Fill the preset defaults, reject contradictions with a one-line message, and return the final
    config (frozen: nothing changes it afterwards)."""
    c = dataclasses.asdict(cfg)
    check_ranges(c, error)
    if c["use_flash_attention"]:
        c["bf16"] = True          # the recipe's flash path is bf16; SDPA picks flash kernels itself
    if c["bf16"] + c["fp16"] + c["fp32"] > 1:
        error("--bf16, --fp16 and --fp32 are exclusive")
    # speed defaults: on CUDA bf16 (where supported), compiled, the recompute policy the memory plan
    # picks; on CPU fp32, eager, full recomputation
    cuda = torch.cuda.is_available()
    if not (c["bf16"] or c["fp16"] or c["fp32"]):
        c["bf16"] = cuda and torch.cuda.is_bf16_supported()
        c["fp32"] = not c["bf16"]
    if c["compile"] is None:
        c["compile"] = cuda
    if c["recompute"] is None:
        c["recompute"] = "auto" if cuda else "full"
    c["mode"] = c["mode"] or "lora"            # the recipe's common case, and the demo's
    if c["mode"] == "full" and (c["lora_alpha"] or c["lora_alpha_ratio"] or c["lora_dropout"]):
        error("--lora_alpha/--lora_alpha_ratio/--lora_dropout need --lora or --qlora, not --full")
    task = TASKS[c["task"]]
    c["output_dir"] = c["output_dir"] or f"output/{c['task']}"
    for d in [Path(c["output_dir"]), *Path(c["output_dir"]).parents]:   # the first one that exists
        if d.exists():
            if not d.is_dir():
                error(f"--output_dir {c['output_dir']} is a file, not a directory" if d == Path(c["output_dir"])
                      else f"--output_dir {c['output_dir']}: {d} is a file, not a directory")
            break
    for flag in ("data_dir", "adapter") + (("resume",) if c["resume"] not in (None, "latest") else ()):
        if c[flag] and Path(c[flag]).exists() and not Path(c[flag]).is_dir():
            error(f"--{flag} {c[flag]} is a file, not a directory")
    if c["adapter"] and not Path(c["adapter"]).is_dir():
        error(f"--adapter {c['adapter']} does not exist (a peft adapter directory)")
    if Path(c["model"]).is_file():
        error(f"--model {c['model']} is a file; expected a checkpoint directory or a hub id")
    if c["task"] == "jsonl":
        if not c["train_file"] and not (c["eval_only"] and c["eval_file"]):
            error("--task jsonl needs --train_file (and optionally --eval_file)")
    elif c["task"] == "demo":
        # the demo writes its own tiny model and dataset there (main); no downloads
        data = Path(c["data_dir"] or Path(c["output_dir"]) / "demo_data")
        c["data_dir"], c["train_file"], c["eval_file"] = str(data), str(data / task.train), str(data / task.eval)
        if c["model"] == TrainConfig.model:
            c["model"] = str(Path(c["output_dir"]) / "demo_model")
        for k, v in DEMO_DEFAULTS.items():
            if c[k] == TrainConfig.__dataclass_fields__[k].default:
                c[k] = v
    else:
        if not c["data_dir"]:
            error(f"--task {c['task']} needs --data_dir (a folder written by python -m convert.{c['task']})")
        if not Path(c["data_dir"]).is_dir():
            error(f"--data_dir {c['data_dir']} does not exist")
        c["train_file"] = c["train_file"] or str(Path(c["data_dir"]) / task.train)
        c["eval_file"] = c["eval_file"] or str(Path(c["data_dir"]) / task.eval)
    if c["task"] != "demo":
        for f in (c["train_file"], c["eval_file"]):
            if f and Path(f).is_dir():
                error(f"data file {f} is a directory, not a jsonl file")
            if f and not Path(f).is_file() and not (c["eval_only"] and f == c["train_file"]):
                error(f"data file {f} does not exist")
    if c["num_crops"] is None:
        c["num_crops"] = task.num_crops
    if c["learning_rate"] is None:
        c["learning_rate"] = 5e-3 if c["task"] == "demo" else 4e-5 if c["mode"] == "full" else 2e-4
    if c["lora_alpha"] is None:
        c["lora_alpha"] = round(c["lora_rank"] * c["lora_alpha_ratio"]) if c["lora_alpha_ratio"] is not None \
            else 2 * c["lora_rank"]
        if c["lora_alpha"] <= 0:
            error(f"--lora_alpha_ratio {c['lora_alpha_ratio']:g} x --lora_rank {c['lora_rank']} rounds to "
                  f"alpha {c['lora_alpha']}; alpha must be > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if c["batch_size"] % (c["micro_batch_size"] * world):
        error(f"--batch_size {c['batch_size']} is not divisible by --micro_batch_size {c['micro_batch_size']} "
              f"x world size {world}")
    return TrainConfig(**c)


# the numeric flags' ranges: at least this (int flags) / a finite number >= 0 or > 0 (float flags)
MIN_INT = {"batch_size": 1, "micro_batch_size": 1, "max_length": 1, "max_steps": 1, "warmup_steps": 0,
           "num_crops": 1, "lora_rank": 1, "save_steps": 0, "keep_checkpoints": 1, "eval_batch_size": 1,
           "max_eval_samples": 1, "max_new_tokens": 1, "seed": 0, "logging_steps": 1, "num_workers": 0}
POSITIVE = ("learning_rate", "num_train_epochs", "lora_alpha", "lora_alpha_ratio")
NON_NEGATIVE = ("weight_decay", "max_grad_norm")


def check_ranges(c: dict, error) -> None:
    """Every numeric flag the user gave within its range (argparse checked only the types); None
    means unset. Checked before any default is filled in, so a 0 never passes for "unset"."""
    for k, lo in MIN_INT.items():
        if c[k] is not None and c[k] < lo:
            error(f"--{k} must be an integer >= {lo}, got {c[k]}")
    for k in POSITIVE + NON_NEGATIVE:
        v = c[k]
        if v is not None and not (math.isfinite(v) and (v > 0 if k in POSITIVE else v >= 0)):
            error(f"--{k} must be a finite number {'> 0' if k in POSITIVE else '>= 0'}, got {v:g}")
    if not (math.isfinite(c["lora_dropout"]) and 0 <= c["lora_dropout"] < 1):
        error(f"--lora_dropout must be in [0, 1), got {c['lora_dropout']:g}")
    if c["num_crops"] is not None and c["num_crops"] > 16:
        error(f"--num_crops must be 1..16, got {c['num_crops']}")
    if c["seed"] >= 2 ** 32:
        error(f"--seed must be below 2**32, got {c['seed']}")


# ------------------------------------------------------------------------------------------------
def setup(cfg: TrainConfig) -> torch.device:
    """Process group, CPU threads, seeds; the demo's model and data (written once, by rank 0)."""
    device = dist.init()
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        # an explicit OMP_NUM_THREADS wins; else share the cores between the local ranks
        threads = os.environ.get("OMP_NUM_THREADS")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local))
    if cfg.task == "demo" and dist.is_main():
        from phi3v import demo
        if not (Path(cfg.model) / "config.json").exists():
            demo.write_base_model(cfg.model, seed=0, num_crops=cfg.num_crops)
        if not Path(cfg.train_file).exists():
            demo.write_dataset(cfg.data_dir)
    dist.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return device


def build_model(cfg: TrainConfig, device: torch.device) -> Phi3V:
    """Load -> mode set-up (quantise, LoRA, freezing: phi3v.finetune)."""
    model = Phi3V.from_pretrained(cfg.model, dtype=cfg.dtype, device=device)
    return prepare(model, cfg.mode, freeze_vision=cfg.freeze_vision, lora_rank=cfg.lora_rank,
                   lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, adapter=cfg.adapter, seed=cfg.seed)


def plan_memory(cfg: TrainConfig, model: Phi3V, ds: JsonlDataset, pad_id: int, device: torch.device,
                offload: bool, log) -> str:
    """The recomputation policy to train with, and the memory plan's prediction for it (phi3v.memory:
    one step of this run's longest micro-batch on the meta device). With --recompute auto the fastest
    policy whose plan fits the GPU's free memory; a run predicted not to fit says so and names the
    cheapest change that would."""
    longest = max(range(len(ds)), key=lambda i: ds.lengths[i])
    try:
        sample = ds.build(ds.records[longest])
    except ValueError as e:           # a bad record under --skip_bad_records: train without a plan
        log(f"memory plan skipped: {e}")
        return "full" if cfg.recompute == "auto" else cfg.recompute
    batch_of = lambda n: collate([sample] * n, pad_id, pack=cfg.packing)       # noqa: E731
    kw = dict(mode=cfg.mode, freeze_vision=cfg.freeze_vision, world_size=dist.world_size(), dtype=cfg.dtype,
              config=model.config, lora_rank=cfg.lora_rank, batch=batch_of(cfg.micro_batch_size),
              offload_optimizer=offload, offload_activations=cfg.offload_activations)
    # the plan counts the weights, which are on the GPU already: the budget is free + ours
    budget = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)) / 1e9 \
        if device.type == "cuda" else None
    for policy in ("none", "selective", "full") if cfg.recompute == "auto" else (cfg.recompute,):
        plan = memory.estimate(recompute=policy, **kw)
        if budget is None or plan["peak_gb"] <= 0.95 * budget:
            break
    log(f"memory plan: {plan['peak_gb']:.2f} GB peak per process with recompute {policy} "
        f"({kw['batch']['input_ids'].shape[0]} x {kw['batch']['input_ids'].shape[1]} tokens, the longest "
        f"micro-batch)" + (f"; {budget:.2f} GB available on {device}" if budget is not None else ""))
    if budget is not None and plan["peak_gb"] > budget:
        fix = memory.advise(0.95 * budget, batch_for=batch_of, recompute=policy, **kw)
        log(f"warning: the plan predicts {plan['peak_gb']:.2f} GB, more than the {budget:.2f} GB available: "
            + (f"the cheapest change that fits is {fix}" if fix else "no single change fits; use more GPUs "
               "(--nproc_per_node) to shard the optimizer state"))
    return policy


def progress_bar(cfg: TrainConfig, desc: str):
    """A tqdm wrapper for long loops on rank 0 (None with --no_tqdm or on other ranks)."""
    if not (cfg.tqdm and dist.is_main()):
        return None
    from tqdm import tqdm
    return functools.partial(tqdm, desc=desc, leave=False)


def load_train_data(cfg: TrainConfig, proc: Processor, log) -> JsonlDataset:
    ds = JsonlDataset(cfg.train_file, proc, max_length=cfg.max_length,
                      on_too_long="drop" if cfg.drop_too_long else "error",
                      on_bad_record="skip" if cfg.skip_bad_records else "error",
                      progress=progress_bar(cfg, "reading " + Path(cfg.train_file).name))
    log(f"train: {len(ds)} samples from {cfg.train_file}"
        + (f"; skipped {len(ds.skipped)} malformed records" if ds.skipped else "")
        + (f"; dropped {len(ds.dropped)} samples longer than {cfg.max_length} tokens" if ds.dropped else ""))
    for s in ds.skipped[:5]:
        log(f"  skipped: {s}")
    return ds


def make_loader(cfg: TrainConfig, ds: JsonlDataset, sampler: StepSampler, start_step: int, total_steps: int,
                pad_id: int, device: torch.device):
    """Micro-batches of steps start_step..total_steps-1, in order, prepared by worker processes."""
    # own generator: iter(loader) draws a worker seed, which must not advance the global RNG that
    # dropout uses (a resumed run restores that RNG and would otherwise be one draw ahead)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=StepBatchSampler(sampler, start_step, total_steps),
        collate_fn=functools.partial(collate, pad_id=pad_id, pack=cfg.packing),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed))


def resume(cfg: TrainConfig, opt: ZeroAdamW, scaler: DynamicLossScaler, total_steps: int, log) -> tuple[int, list]:
    """Restore the optimizer (and through its fp32 masters the weights), the loss scale and this
    rank's RNG from a checkpoint; returns (start step, logged history). (0, []) without one.

    `--resume` takes the newest checkpoint whose files all have their recorded checksums: a damaged
    one is skipped (saying so) for the one before. A damaged `--resume DIR` is an error."""
    out = Path(cfg.output_dir)
    explicit = cfg.resume != "latest"
    candidates = [Path(cfg.resume)] if explicit else complete_checkpoints(out)
    for ck in candidates:
        problem = verify_checkpoint(ck)      # collective: each rank reads its share of the files
        if problem is None:
            break
        if explicit:
            raise ValueError(f"--resume {ck}: {problem}")
        log(f"--resume: cannot use {ck}: {problem}; falling back to the checkpoint before it")
    else:
        what = "intact" if candidates else "complete"
        log(f"--resume: no {what} checkpoint under {out / 'checkpoints'}, starting from scratch")
        return 0, []
    _, optim_states, meta = load_checkpoint(ck, weights=False, verify=False)
    saved = meta.get("config") or {}
    for k in ("mode", "freeze_vision", "lora_rank"):     # what decides the set and shapes of trained tensors
        if k in saved and saved[k] != getattr(cfg, k) and not (k == "lora_rank" and cfg.mode == "full"):
            raise ValueError(f"--resume {ck}: the checkpoint was trained with {k}={saved[k]!r}, this run has "
                             f"{k}={getattr(cfg, k)!r}; resume with the same settings")
    opt.load_sharded(optim_states)   # re-partitions for this world size; writes the params
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if meta.get("world_size") == dist.world_size() and len(meta["rank_states"]) == dist.world_size():
        set_rng_state(meta["rank_states"][dist.rank()])   # dropout continues bit-exactly
    log(f"resumed from {ck} at step {meta['step']}/{total_steps}")
    return meta["step"], meta.get("history", [])


def missing_outputs(cfg: TrainConfig, with_eval: bool, history: list, step: int) -> list[str]:
    """The final outputs of a run whose training reached `step` that are not in output_dir. An
    output older than that step's checkpoint is from an earlier run and counts as missing."""
    out = Path(cfg.output_dir)
    ck = out / "checkpoints" / f"step-{step}" / "COMPLETE"
    since = ck.stat().st_mtime if ck.exists() else 0.0

    def have(*names) -> bool:
        return all((out / n).is_file() and (out / n).stat().st_mtime >= since for n in names)

    def have_model(d: str) -> bool:
        return have(f"{d}config.json") and (have(f"{d}model.safetensors")
                                            or have(f"{d}model.safetensors.index.json"))
    missing = []
    if with_eval:
        try:
            done = have("eval.json") and json.loads((out / "eval.json").read_text()).get("after") is not None
        except (ValueError, AttributeError):
            done = False
        if not done:
            missing.append("eval after")
    if not (have_model("") if cfg.mode == "full" else have("adapter_config.json", "adapter_model.safetensors")):
        missing.append("model" if cfg.mode == "full" else "adapter")
    if not have("tokenizer.json", "preprocessor_config.json"):
        missing.append("processor files")
    if any("loss" in m for m in history) and not have("loss.png"):
        missing.append("loss.png")
    if cfg.merge and cfg.mode != "full" and not have_model("merged/"):
        missing.append("merged model")
    return missing


def complete_run(cfg: TrainConfig, model: Phi3V, proc: Processor, run_eval, history: list, step: int, log) -> None:
    """A resumed run whose training had already finished: write the final outputs that are missing
    (a kill after the last checkpoint leaves them unwritten) and say which; nothing if all exist."""
    out = Path(cfg.output_dir)
    # rank 0 decides, so every rank takes the same branch (the evaluation is collective)
    missing = dist.all_gather_object(missing_outputs(cfg, run_eval is not None, history, step)
                                     if dist.is_main() else None)[0]        # rank 0's finding, on every rank
    if not missing:
        log(f"this run already finished ({step} steps); nothing to do")
        return
    log(f"training already finished ({step} steps); writing the missing outputs: {', '.join(missing)}")
    if "eval after" in missing:
        before = None
        if dist.is_main():
            try:
                before = json.loads((out / "eval.json").read_text()).get("before")
            except (OSError, ValueError, AttributeError):
                pass                   # never evaluated (or the file is gone): not made up now
            truncate_metrics(out / "metrics.jsonl", step)          # drops a line cut by the kill
        eval_after(out, run_eval, before, step, log)
    if dist.is_main() and set(missing) - {"eval after"}:
        export(cfg, model, proc, history, log)
    log(f"done: {out}")


class RunLog:
    """The loop's bookkeeping: sums over logging windows, metrics.jsonl (+ TensorBoard when installed),
    the progress bar or console lines. Only rank 0 writes; every rank keeps the same history."""

    def __init__(self, cfg: TrainConfig, start_step: int, total_steps: int, steps_per_epoch: int, history: list):
        self.out, self.every, self.total = Path(cfg.output_dir), cfg.logging_steps, total_steps
        self.steps_per_epoch, self.history = steps_per_epoch, history
        self.main, self.show_bar, self.start = dist.is_main(), cfg.tqdm, start_step
        self.metrics = self.tb = self.bar = None
        if self.main:
            path = self.out / "metrics.jsonl"
            if start_step == 0:
                path.unlink(missing_ok=True)              # a fresh run in a used output_dir
            else:
                truncate_metrics(path, start_step)        # a resumed run logs the later steps again
            self.metrics = open(path, "a")
            if importlib.util.find_spec("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
        self._reset()

    def note(self, msg: str) -> None:
        """A console line from rank 0 that does not break the progress bar."""
        if self.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def _reset(self):
        self.loss, self.tokens, self.seen, self.t0 = 0.0, 0, 0, time.time()

    def step(self, done: int, loss_sum: float, n_tok: int, n_seen: int, lr: float, gnorm: float,
             overflow: bool, skipped_total: int) -> None:
        """Account one optimizer step; every `logging_steps` (and at the end) write a record."""
        if self.main and self.show_bar and self.bar is None:     # started here, after the eval before
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.start, desc="train", dynamic_ncols=True)
        self.loss, self.tokens, self.seen = self.loss + loss_sum, self.tokens + n_tok, self.seen + n_seen
        if done % self.every == 0 or done == self.total:
            rec = {"step": done, "loss": self.loss / max(self.tokens, 1), "lr": lr,
                   "grad_norm": gnorm if math.isfinite(gnorm) else None,   # strict JSON: no NaN/inf
                   "tokens_per_s": self.seen / (time.time() - self.t0), "epoch": done / self.steps_per_epoch,
                   "skipped_samples": skipped_total}
            if torch.cuda.is_available():     # decimal GB, as bench/ and the memory plan report it
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if overflow:
                rec["fp16_overflow_skipped"] = True
            self.history.append(rec)
            if self.main:
                self.metrics.write(json.dumps(rec) + "\n")
                self.metrics.flush()
                if self.tb:
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        if rec[k] is not None:
                            self.tb.add_scalar(f"train/{k}", rec[k], done)
                if self.bar is None:
                    print(json.dumps(rec), flush=True)
            self._reset()
        if self.bar is not None:
            self.bar.update(1)
            if self.history:
                h = self.history[-1]
                self.bar.set_postfix(loss=f"{h['loss']:.4f}", lr=f"{h['lr']:.2e}", tok_s=f"{h['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics:
            self.metrics.close()


def log_eval(out: Path, step: int, when: str, res: dict) -> None:
    """One metrics.jsonl record per evaluation ("before" / "after"). Rank 0 only."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "eval": when, **{k: v for k, v in res.items() if k != "examples"}}) + "\n")


def write_eval(out: Path, before: dict | None, after: dict | None) -> None:
    """eval.json = {"before", "after"}, replaced atomically. Rank 0 only."""
    write_text_atomic(out / "eval.json", json.dumps({"before": before, "after": after}, indent=2))


def eval_after(out: Path, run_eval, before: dict | None, step: int, log) -> None:
    """The evaluation after training (collective), into eval.json and metrics.jsonl."""
    after = run_eval("after")
    log(f"eval after: {summary(after)}")
    if dist.is_main():
        write_eval(out, before, after)
        log_eval(out, step, "after", after)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`; a line cut by a crash is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))     # a kill here loses nothing


def plot_loss(metrics: list[dict], path: Path) -> None:
    """loss.png: matplotlib when installed, else a plain Pillow line plot."""
    pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not pts:
        return
    xs, ys = zip(*pts)
    if importlib.util.find_spec("matplotlib"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (per token)")
        fig.tight_layout()
        write_atomic(path, lambda p: fig.savefig(p, format="png"))
        plt.close(fig)
        return
    from PIL import Image, ImageDraw
    w, h, m = 640, 400, 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    sx = (w - 2 * m) / max(x1 - x0, 1)
    sy = (h - 2 * m) / max(y1 - y0, 1e-9)
    d.line([(m + (x - x0) * sx, h - m - (y - y0) * sy) for x, y in pts] if len(pts) > 1 else
           [(m, h / 2), (w - m, h / 2)], fill="blue", width=2)
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 8), f"train loss (per token): {ys[0]:.3f} -> {ys[-1]:.3f} over {x1} steps", fill="black")
    d.text((4, m), f"{y1:.2f}", fill="black")
    d.text((4, h - m - 10), f"{y0:.2f}", fill="black")
    d.text((m, h - m + 6), str(x0), fill="black")
    d.text((w - m - 20, h - m + 6), str(x1), fill="black")
    d.text((w // 2 - 40, h - m + 6), "optimizer step", fill="black")
    write_atomic(path, lambda p: im.save(p, format="PNG"))


def export(cfg: TrainConfig, model: Phi3V, proc: Processor, history: list, log) -> None:
    """The final model (peft adapter, or HF layout for --full), processor files, loss.png, and with
    --merge the adapter folded into the unquantised base under merged/. Rank 0 only."""
    out = Path(cfg.output_dir)
    proc.save_pretrained(out)
    if cfg.mode == "full":
        model.save_pretrained(out)
    else:
        save_adapter(model, out, base_model_name_or_path=cfg.model)
    plot_loss(history, out / "loss.png")
    if cfg.merge:
        if cfg.mode == "full":
            log("--merge with --full: the model in the output dir is already a full HF checkpoint")
            return
        dtype = torch.float32 if cfg.dtype == torch.float16 else cfg.dtype
        base = Phi3V.from_pretrained(cfg.model, dtype=dtype)
        load_adapter(base, out)                      # onto the unquantised base (also for QLoRA)
        merge_lora(base)
        base.save_pretrained(out / "merged")
        proc.save_pretrained(out / "merged")
        log(f"merged model -> {out / 'merged'}")


# ------------------------------------------------------------------------------------------------
def make_evaluator(cfg: TrainConfig, model: Phi3V, proc: Processor):
    """`run_eval(when)` -> scores of the eval split with this run's settings (None without an eval
    file); every record's prediction goes to output_dir/predictions/<when>.jsonl (rank 0; `when`:
    "before", "step-N", "after", "eval_only"), before the caller records the scores."""
    if not cfg.eval_file:
        return None
    records = load_eval_records(cfg.eval_file, cfg.max_eval_samples)

    def run_eval(when: str) -> dict:
        res = evaluate(model, proc, records, Path(cfg.eval_file).parent / "images", batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.max_new_tokens, with_anls=TASKS[cfg.task].anls,
                       num_workers=cfg.num_workers, progress=progress_bar(cfg, f"eval {when}"))
        predictions = res.pop("predictions")
        if dist.is_main():
            write_predictions(cfg.output_dir, when, predictions)
        return res
    return run_eval


def summary(res: dict) -> str:
    return f"accuracy {res['accuracy']:.3f}" + (f", ANLS {res['anls']:.3f}" if "anls" in res else "")


def main(cfg: TrainConfig) -> None:
    device = setup(cfg)
    main_rank, world = dist.is_main(), dist.world_size()
    log = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)
    out, eval_path = Path(cfg.output_dir), Path(cfg.output_dir) / "eval.json"
    proc = Processor.from_pretrained(cfg.model, num_crops=cfg.num_crops)
    model = build_model(cfg, device)
    top_id = max(proc.tokenizer.get_vocab(with_added_tokens=True).values())
    if top_id >= model.config.vocab_size:      # the training forward never checks token ids (no host syncs)
        raise ValueError(f"{cfg.model}: the tokenizer has token ids up to {top_id} but config.json's vocab_size is "
                         f"{model.config.vocab_size} (tokenizer and weights of different models?)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log(f"model {cfg.model}: mode {cfg.mode}{' (vision frozen)' if cfg.freeze_vision else ''}, {cfg.dtype}, "
        f"{sum(p.numel() for _, p in named):,} trainable parameters, world size {world}, device {device}")
    out.mkdir(parents=True, exist_ok=True)
    run_eval = make_evaluator(cfg, model, proc)
    if cfg.eval_only:
        if run_eval is None:
            raise ValueError("--eval_only needs an eval split (--eval_file or the preset's val file)")
        res = run_eval("eval_only")
        if main_rank:   # nothing is trained: the model before and after is the one evaluated
            write_eval(out, res, res)
            log(f"eval: {summary(res)} -> {eval_path}, {out / 'predictions' / 'eval_only.jsonl'}")
        return dist.cleanup()

    train_ds = load_train_data(cfg, proc, log)
    offload = memory.offload_optimizer(cfg.offload_optimizer, cfg.mode, cfg.batch_size, cfg.micro_batch_size, world)
    recompute = plan_memory(cfg, model, train_ds, proc.pad_token_id, device, offload, log)
    model.configure_training(recompute=recompute, compile=cfg.compile, offload_activations=cfg.offload_activations)
    log(f"speed settings: {str(cfg.dtype).replace('torch.', '')}, compile {'on' if cfg.compile else 'off'}, "
        f"recompute {recompute}" + (" (auto)" if cfg.recompute == "auto" else "")
        + (f", TF32 {'on' if cfg.tf32 else 'off'}" if device.type == "cuda" else "")
        + f", optimizer state {'in host memory' if offload else 'on ' + device.type}"
        + (" (auto)" if cfg.offload_optimizer == "auto" else "")
        + f", saved activations {'in host memory' if cfg.offload_activations else 'on ' + device.type}")
    sampler = StepSampler(train_ds.lengths, cfg.batch_size, cfg.micro_batch_size, dist.rank(), world, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * sampler.steps_per_epoch))
    opt = ZeroAdamW(named, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, no_decay=no_decay,
                    max_grad_norm=cfg.max_grad_norm, offload=offload)
    scaler = DynamicLossScaler(enabled=cfg.fp16)     # fp16 only; otherwise scale 1, never an overflow
    start_step, history = resume(cfg, opt, scaler, total_steps, log) if cfg.resume else (0, [])
    if start_step >= total_steps:     # finished training; the evaluation and export may be missing
        complete_run(cfg, model, proc, run_eval, history, start_step, log)
        return dist.cleanup()
    run_log = RunLog(cfg, start_step, total_steps, sampler.steps_per_epoch, history)
    # the eval before training runs once; a resumed run keeps it from eval.json
    before = json.loads(eval_path.read_text()).get("before") if start_step and eval_path.exists() else None
    if run_eval and before is None:
        before = run_eval("before")
        log(f"eval before: {summary(before)}")
        if main_rank:
            write_eval(out, before, None)
            log_eval(out, start_step, "before", before)

    batches = iter(make_loader(cfg, train_ds, sampler, start_step, total_steps, proc.pad_token_id, device))
    skipped = 0
    model.train()
    for step in range(start_step, total_steps):
        opt.lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.lr_schedule)
        loss_sum, n_tok, n_seen = torch.zeros((), dtype=torch.float64, device=device), 0, 0
        # gradient accumulation: every micro-batch's backward adds into .grad; no averaging here.
        # A micro-step never waits for the GPU: the collator computed every data-dependent index on
        # the CPU, and the loss stays on the device until the step's one all-reduce below.
        micro = sampler.micro_batches(step)
        for i in range(len(micro)):
            # ZeRO-2: during the step's last backward, gradient buckets are reduced as they become ready
            opt.sync_grads = i == len(micro) - 1
            batch = next(batches)
            skipped += len(batch["skipped"])
            if batch["n_samples"] == 0:      # every sample of it was unreadable (--skip_bad_records)
                continue
            # summed (not averaged) CE: the step below divides by the token count of the whole batch
            loss = model.training_loss(to_device(batch, device))
            (loss * scaler.scale).backward()
            loss_sum += loss.detach()
            n_tok, n_seen = n_tok + batch["n_targets"], n_seen + batch["n_tokens"]
        # normalise by the global number of supervised tokens of this optimizer step (all micro-batches,
        # all ranks), so every answer token weighs the same however the batch is split (STYLE §8)
        counts = torch.tensor([n_tok, n_seen], dtype=torch.float64, device=device)
        g_loss, g_tok, g_seen = dist.all_reduce_sum(torch.cat([loss_sum.view(1), counts])).tolist()
        gnorm = opt.step(grad_scale=1.0 / max(g_tok, 1.0) / scaler.scale)   # clip, AdamW, write back
        opt.zero_grad()
        overflow = scaler.update(gnorm)      # fp16: an inf/nan norm skipped the step, halve the scale
        run_log.step(step + 1, g_loss, int(g_tok), int(g_seen), opt.lr, gnorm, overflow, skipped)
        if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or step + 1 == total_steps:
            meta = {"total_steps": total_steps, "config": dataclasses.asdict(cfg), "history": run_log.history,
                    "world_size": world, "scaler": scaler.state_dict() if cfg.fp16 else None}
            path = save_checkpoint(out, step + 1, {n: p.detach() for n, p in named}, opt.state_dict(), meta,
                                   keep_last=cfg.keep_checkpoints, rank_state=rng_state())
            run_log.note(f"checkpoint {path}")
    run_log.close()

    if run_eval:
        eval_after(out, run_eval, before, total_steps, log)
    if main_rank:
        export(cfg, model, proc, run_log.history, log)
        log(f"done: {out}")
    dist.cleanup()


if __name__ == "__main__":
    with cli.errors("train.py"):     # one line `train.py: error: ...`; PHI3V_DEBUG=1 for the traceback
        main(parse_args())
