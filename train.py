"""Fine-tune Phi-3.5-vision: full, frozen-vision, LoRA or QLoRA; one process or torchrun.

    python train.py --task demo                                   # offline, CPU, a few minutes
    torchrun --nproc_per_node=4 train.py --task ucf101 --data_dir DIR --lora --bf16

The loop is written out in order: config -> distributed init -> processor/model -> quantise/LoRA ->
data -> optimizer -> resume -> eval before -> (micro-steps, optimizer step, log, checkpoint)* ->
eval after -> export. Everything it calls is a plain function below or a module of phi3v/.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from phi3v import Phi3V, Processor, cli, dist, memory
from phi3v.checkpoint import (complete_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                              verify_checkpoint)
from phi3v.data import JsonlDataset, StepBatchSampler, StepSampler, collate, to_device
from phi3v.evaluate import evaluate, length_batches, load_eval_records, write_predictions
from phi3v.finetune import prepare
from phi3v.jsonfile import finite, json_line, write_atomic, write_text_atomic
from phi3v.lora import load_adapter, merge_lora, save_adapter
from phi3v.optim import DynamicLossScaler, ZeroAdamW, lr_at, no_decay
from phi3v.runlock import lock_dir


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
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (or --max_steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (instead of --num_train_epochs)"})
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
    index_cache: str | None = field(default=None, metadata={
        "help": "folder of the data index cache (exact token counts, built once per dataset): default "
                "$PHI3V_CACHE or ~/.cache/phi3v; none: index the data at every start"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept"})
    resume: str | None = field(default=None, metadata={"help": "resume from DIR or (no value) the newest checkpoint",
                                                       "nargs": "?", "const": "latest"})
    eval_only: bool = field(default=False, metadata={"help": "only evaluate --model (+ --adapter)"})
    eval_batch_size: int = field(default=1, metadata={"help": "prompts per generate call"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N records"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation length at evaluation"})
    eval_steps: int = field(default=0, metadata={
        "help": "also evaluate every N optimizer steps and at the end: the validation loss on the eval split "
                "(its first --max_eval_samples) and the task metric by generation (0: only before and after)"})
    max_generate_samples: int | None = field(default=None, metadata={
        "help": "records answered by generation at each evaluation (default: --max_eval_samples)"})
    save_best: str | None = field(default=None, metadata={
        "help": "keep the model of the best evaluation by this metric in output_dir/best/ (with best.json); "
                "needs --eval_steps", "choices": ["accuracy", "anls", "val_loss"]})
    early_stopping: int | None = field(default=None, metadata={
        "help": "stop after N evaluations in a row without a better --save_best metric, then export"})
    report_to: str | None = field(default=None, metadata={
        "help": "experiment trackers, a comma list of tensorboard, wandb, none (default: tensorboard when "
                "installed); rank 0 logs"})
    merge: bool = field(default=False, metadata={
        "help": "LoRA/QLoRA: also write the adapter merged into the base (merged/, HF layout)"})
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
    # no argparse defaults: the namespace holds exactly the flags given (the dataclass fills the rest),
    # so `resolve` can tell a flag the user gave from a default, even one given at its default value
    p = cli.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)

    def error(msg):  # one line, no usage dump
        sys.stderr.write(f"train.py: error: {msg}\n")
        sys.exit(2)
    p.error = error
    actions = []
    modes = p.add_mutually_exclusive_group()
    actions.append(modes.add_argument("--lora", "--use_lora", dest="mode", action="store_const", const="lora",
                                      help="LoRA"))
    actions.append(modes.add_argument("--qlora", "--use_qlora", dest="mode", action="store_const", const="qlora",
                                      help="QLoRA: NF4 base + LoRA"))
    actions.append(modes.add_argument("--full", "--full_train", dest="mode", action="store_const", const="full",
                                      help="full fine-tuning (ZeRO-2)"))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "mode":
            continue
        names = [f"--{f.name}"] + f.metadata.get("aliases", [])
        kw = {"help": f.metadata.get("help", ""), "dest": f.name}
        if f.type in ("bool", bool, "bool | None"):
            if f.name in ("tqdm", "compile", "tf32"):     # --x / --no_x (and the recipe's --no-tqdm)
                actions.append(p.add_argument(f"--{f.name}", action="store_true", **kw))
                actions.append(p.add_argument(f"--no_{f.name}", f"--no-{f.name}", dest=f.name, action="store_false"))
            else:
                actions.append(p.add_argument(*names, action=argparse.BooleanOptionalAction if f.default
                                              else "store_true", **kw))
            continue
        base = f.type.split(" | ")[0] if isinstance(f.type, str) else f.type
        kw["type"] = {"int": int, "float": float, "str": str}.get(base, str)
        for k in ("choices", "nargs", "const"):
            if k in f.metadata:
                kw[k] = f.metadata[k]
        actions.append(p.add_argument(*names, **kw))
    a = vars(p.parse_args(argv))
    return resolve(TrainConfig(**{f.name: a.get(f.name, f.default) for f in dataclasses.fields(TrainConfig)}),
                   error, given_flags(a, actions, sys.argv[1:] if argv is None else argv))


def given_flags(parsed: dict, actions: list, argv: list) -> dict[str, str]:
    """{field: the flag as the user spelled it} for every field set on the command line (the last
    spelling of it in argv: `--full_train`, `--no-drop_too_long`; an abbreviation reads as `--field`)."""
    dest_of = {s: act.dest for act in actions for s in act.option_strings}
    spelled = {}
    for tok in map(str, argv):
        if tok == "--":
            break
        opt = tok.split("=", 1)[0]
        if opt in dest_of:
            spelled[dest_of[opt]] = opt
    return {k: spelled.get(k, f"--{v}" if k == "mode" else f"--{k}") for k, v in parsed.items()}


def resolve(cfg: TrainConfig, error, given: dict[str, str] | None = None) -> TrainConfig:
    """Fill the preset defaults, reject contradictions and flags that would do nothing with a one-line
    message, and return the final config (frozen: nothing changes it afterwards). `given`: the flags
    on the command line as `given_flags` returns them; for a config built in code (None), the fields
    that differ from their defaults."""
    c = dataclasses.asdict(cfg)
    if given is None:
        given = {k: f"--{v}" if k == "mode" else f"--{k}" for k, v in c.items()
                 if v != TrainConfig.__dataclass_fields__[k].default}
    check_ranges(c, error)
    if c["use_flash_attention"]:
        if c["fp16"] or c["fp32"]:
            error(f"{given.get('use_flash_attention', '--use_flash_attention')} implies --bf16 (the recipe's flash "
                  f"attention runs in bf16 only), which contradicts {'--fp16' if c['fp16'] else '--fp32'}: give one")
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
    task = TASKS[c["task"]]
    c["output_dir"] = c["output_dir"] or f"output/{c['task']}"
    for d in [Path(c["output_dir"]), *Path(c["output_dir"]).parents]:   # the first one that exists
        if d.exists():
            if not d.is_dir():
                error(f"--output_dir {c['output_dir']} is a file, not a directory" if d == Path(c["output_dir"])
                      else f"--output_dir {c['output_dir']}: {d} is a file, not a directory")
            break
    for flag in ("data_dir", "adapter", "index_cache") + (("resume",) if c["resume"] not in (None, "latest") else ()):
        if c[flag] and Path(c[flag]).exists() and not Path(c[flag]).is_dir():
            error(f"--{flag} {c[flag]} is a file, not a directory")
    if c["adapter"] and not Path(c["adapter"]).is_dir():
        error(f"--adapter {c['adapter']} does not exist (a peft adapter directory)")
    if Path(c["model"]).is_file():
        error(f"--model {c['model']} is a file; expected a checkpoint directory or a hub id")
    # the data files this run reads (--eval_only: the eval split only); a preset takes from --data_dir
    # those not named by a flag, the demo writes its own there
    files = ("eval_file",) if c["eval_only"] else ("train_file", "eval_file")
    reads_data_dir = c["task"] == "demo" or (c["task"] != "jsonl" and not all(c[k] for k in files))
    if c["task"] == "jsonl":
        if c["eval_only"] and not c["eval_file"]:
            error("--eval_only evaluates an eval split: --task jsonl needs --eval_file")
        if not c["eval_only"] and not c["train_file"]:
            error("--task jsonl needs --train_file (and optionally --eval_file)")
    elif c["task"] == "demo":
        # the demo writes its own tiny model and dataset there (setup); no downloads
        data = Path(c["data_dir"] or Path(c["output_dir"]) / "demo_data")
        c["data_dir"], c["train_file"], c["eval_file"] = str(data), str(data / task.train), str(data / task.eval)
        if "model" not in given:
            c["model"] = str(Path(c["output_dir"]) / "demo_model")
        elif not Path(c["model"]).is_dir():
            error(f"{given['model']} {c['model']}: --task demo downloads nothing and writes its tiny model only to "
                  "OUTPUT_DIR/demo_model; give an existing local model folder or leave the flag out (to fine-tune "
                  "a hub model, use --task jsonl or a preset)")
        for k, v in DEMO_DEFAULTS.items():
            if k not in given:
                c[k] = v
    elif reads_data_dir:
        if not c["data_dir"]:
            error(f"--task {c['task']} needs --data_dir (a folder written by python -m convert.{c['task']})")
        if not Path(c["data_dir"]).is_dir():
            error(f"--data_dir {c['data_dir']} does not exist")
        c["train_file"] = c["train_file"] or str(Path(c["data_dir"]) / task.train)
        c["eval_file"] = c["eval_file"] or str(Path(c["data_dir"]) / task.eval)
    check_ignored(c, given, reads_data_dir, error)
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
    check_evaluation(c, error)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not c["eval_only"] and c["batch_size"] % (c["micro_batch_size"] * world):
        error(f"--batch_size {c['batch_size']} is not divisible by --micro_batch_size {c['micro_batch_size']} "
              f"x world size {world}")
    return TrainConfig(**c)


LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_alpha_ratio", "lora_dropout")
EVAL_FLAGS = ("eval_batch_size", "max_eval_samples", "max_new_tokens", "eval_steps", "max_generate_samples",
              "save_best", "early_stopping")
# what --eval_only reads (main: the model as set up for the mode, the processor, the eval split, the
# generation settings and its data-loader workers); every other flag only matters to training
EVAL_ONLY_READS = ("task", "data_dir", "eval_file", "output_dir", "model", "adapter", "mode", "bf16", "fp16", "fp32",
                   "tf32", "num_crops", "eval_only", "eval_batch_size", "max_eval_samples", "max_new_tokens", "tqdm",
                   "use_flash_attention", "num_workers")
TRAINING_ONLY = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in EVAL_ONLY_READS)


def check_ignored(c: dict, given: dict[str, str], reads_data_dir: bool, error) -> None:
    """A flag the user gave that this mode, task or --eval_only would ignore, or that another flag
    overrides, is an error saying why and what to use instead (`c`: the config with the task's files
    and defaults filled in; `given`: {field: flag as spelled})."""
    mode = given.get("mode", f"--{c['mode']}")
    named = " and ".join(given[k] for k in ("train_file", "eval_file") if k in given)
    rules = [   # (flags, whether they would do nothing here, why and what instead)
        (("adapter",), c["mode"] == "full",
         f"is never loaded with {mode}, which fine-tunes the weights of --model itself: merge the adapter into its "
         "base first (a LoRA run's --merge writes OUTPUT_DIR/merged/) and pass that as --model, or train the "
         "adapter on with --lora or --qlora"),
        (LORA_FLAGS, c["mode"] == "full", f"configures a LoRA adapter, and {mode} trains none: use --lora or "
                                          "--qlora, or leave it out"),
        (TRAINING_ONLY, c["eval_only"], "applies to training, and --eval_only trains nothing: leave it out"),
        (LORA_FLAGS, bool(c["adapter"]), "is decided by the adapter: --adapter continues it with the rank, alpha and "
                                         "dropout of its adapter_config.json (leave it out)"),
        (("lora_alpha_ratio",), "lora_alpha" in given, "is overridden by --lora_alpha (both set alpha): give one"),
        (("merge",), c["mode"] == "full", f"folds a LoRA adapter into its base, and {mode} already writes the "
                                          "whole model (HF layout) to --output_dir: leave it out"),
        (("num_train_epochs",), "max_steps" in given, "is overridden by --max_steps (both set the length of "
                                                      "training): give one"),
        (("data_dir",), not reads_data_dir, f"is not read: {named} name{'s' * (' and ' not in named)} every data "
                                            "file this run reads (images/ beside each): leave it out"),
        (("train_file", "eval_file"), c["task"] == "demo", "is not read by --task demo, which generates its own "
                                                           "dataset in --data_dir: for your own data use --task "
                                                           "jsonl (or a preset)"),
        (("packing",), c["micro_batch_size"] == 1, "packs the samples of a micro-batch into one row, and with "
                                                   "--micro_batch_size 1 each row holds one sample anyway: raise "
                                                   "--micro_batch_size, or leave it out"),
        (("drop_too_long",), c["max_length"] is None, "decides what happens to samples over --max_length, and "
                                                      "without --max_length none is too long: add --max_length L, "
                                                      "or leave it out"),
        (EVAL_FLAGS, not c["eval_file"], "configures the evaluation, and there is no eval split (--task jsonl "
                                         "without --eval_file): add --eval_file, or leave it out"),
        (("max_eval_samples",), "max_generate_samples" in given and not c["eval_steps"],
         "is overridden by --max_generate_samples: without --eval_steps (no validation loss) both only count the "
         "records answered by generation; give one"),
    ]
    for flags, ignored, why in rules:
        hit = [k for k in flags if k in given]
        if ignored and hit:
            error(f"{given[hit[0]]} {why}")


def check_evaluation(c: dict, error) -> None:
    """The watching flags (--save_best, --early_stopping, --report_to): each needs what it works on, and
    --report_to its packages (an eval split and training are check_ignored's)."""
    c["report_to"] = report_targets(c["report_to"], error)
    if c["save_best"] and not c["eval_steps"]:
        error("--save_best needs --eval_steps N (the evaluations it picks the best of)")
    if c["early_stopping"] and not c["save_best"]:
        error("--early_stopping needs --save_best METRIC (the metric whose improvement it waits for)")
    if c["save_best"] == "anls" and not TASKS[c["task"]].anls:
        error(f"--save_best anls: ANLS is computed for --task docvqa only, not {c['task']}; use accuracy or val_loss")


TRACKERS = ("tensorboard", "wandb")


def report_targets(value: str | None, error) -> str:
    """--report_to as a normalised comma list ("none" for no tracker); default: tensorboard when installed.
    A tracker whose package is missing is an error that says how to install it."""
    if value is None:
        return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in TRACKERS + ("none",)]
    if bad or not names:
        error(f"--report_to takes a comma list of {', '.join(TRACKERS)}, none; got {value!r}")
    if "none" in names and len(names) > 1:
        error(f"--report_to {value}: 'none' cannot be combined with a tracker")
    for n in names:
        if n != "none" and importlib.util.find_spec(n) is None:
            error(f"--report_to {n}: the {n} package is not installed (pip install {n})")
    return ",".join(names)


# the numeric flags' ranges: at least this (int flags) / a finite number >= 0 or > 0 (float flags)
MIN_INT = {"batch_size": 1, "micro_batch_size": 1, "max_length": 1, "max_steps": 1, "warmup_steps": 0,
           "num_crops": 1, "lora_rank": 1, "save_steps": 0, "keep_checkpoints": 1, "eval_batch_size": 1,
           "max_eval_samples": 1, "max_new_tokens": 1, "seed": 0, "logging_steps": 1, "num_workers": 0,
           "eval_steps": 0, "max_generate_samples": 1, "early_stopping": 1}
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
    lock_output_dir(cfg)
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


def lock_output_dir(cfg: TrainConfig) -> None:
    """One run per output_dir (phi3v.runlock): rank 0 takes output_dir/.lock before anything there is
    touched and holds it until the process ends. Every rank gets rank 0's answer, so all stop with the
    same line if another run holds it."""
    note = problem = None
    if dist.is_main():
        try:
            lock, note = lock_dir(cfg.output_dir)
            atexit.register(lock.release)             # also after an error; a kill leaves it to the kernel
        except ValueError as e:                       # another run holds it
            problem = f"--output_dir {e}; wait for that run to end or choose another --output_dir"
        except OSError as e:                          # the directory or the file cannot be created
            problem = str(e)
    problem = dist.all_gather_object(problem)[0]
    if problem:
        raise ValueError(problem)
    if note:
        print(note, flush=True)


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
    try:
        sample = ds.build(int(np.argmax(ds.lengths)))
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
    t0 = time.time()
    ds = JsonlDataset(cfg.train_file, proc, max_length=cfg.max_length,
                      on_too_long="drop" if cfg.drop_too_long else "error",
                      on_bad_record="skip" if cfg.skip_bad_records else "error",
                      progress=progress_bar(cfg, "indexing " + Path(cfg.train_file).name),
                      cache_dir=index_cache_dir(cfg))
    if ds.cache_note:
        log(f"warning: {ds.cache_note}")
    log(f"train: {len(ds)} samples from {cfg.train_file} (index {'cached' if ds.index_source == 'cache' else 'built'} "
        f"in {time.time() - t0:.1f} s)"
        + (f"; skipped {len(ds.skipped)} malformed records" if ds.skipped else "")
        + (f"; dropped {ds.n_dropped} samples longer than {cfg.max_length} tokens" if ds.n_dropped else ""))
    for s in ds.skipped[:5]:
        log(f"  skipped: {s}")
    return ds


def index_cache_dir(cfg: TrainConfig):
    """--index_cache as JsonlDataset's cache_dir: None (the default folder), False (none) or a folder."""
    return False if cfg.index_cache == "none" else cfg.index_cache


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


def resume(cfg: TrainConfig, opt: ZeroAdamW, scaler: DynamicLossScaler, total_steps: int, log
           ) -> tuple[int, list, bool]:
    """Restore the optimizer (and through its fp32 masters the weights), the loss scale and this
    rank's RNG from a checkpoint; returns (start step, logged history, whether the run stopped early
    there). (0, [], False) without one.

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
        return 0, [], False
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
    log(f"resumed from {ck} at step {meta['step']}/{total_steps}"
        + (" (where it stopped early)" if meta.get("early_stopped") else ""))
    return meta["step"], meta.get("history", []), bool(meta.get("early_stopped"))


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
            truncate_metrics(out / "metrics.jsonl", step, drop=("after",))   # a line cut by the kill too

        def record(step, when, res):
            log(f"eval {when}: {summary(res)}")
            if dist.is_main():
                log_eval(out, step, when, res)
        eval_after(out, run_eval, before, step, record)
    if dist.is_main() and set(missing) - {"eval after"}:
        export(cfg, model, proc, history, log)
    log(f"done: {out}")


class Trackers:
    """The experiment trackers of --report_to, on rank 0: TensorBoard (output_dir/tensorboard/) and
    Weights & Biases (project $WANDB_PROJECT or "phi3v", the run named after output_dir, this run's
    config recorded; a resumed run continues the W&B run of its output_dir; WANDB_MODE=offline works
    without a network). `log` takes {name: value} at an optimizer step; None and non-finite values
    are left out."""

    def __init__(self, cfg: TrainConfig, resumed: bool):
        names, out = cfg.report_to.split(","), Path(cfg.output_dir)
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in names:
            import wandb
            id_file = out / "wandb" / "run_id"
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "phi3v", name=out.name, id=run_id,
                                    dir=str(out), resume="allow", config=dataclasses.asdict(cfg))

    def log(self, scalars: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


EVAL_SCALARS = ("val_loss", "accuracy", "anls")


class RunLog:
    """The loop's bookkeeping: sums over logging windows, metrics.jsonl, the trackers, the progress
    bar or console lines. Only rank 0 writes; every rank keeps the same history (step records and
    evaluations)."""

    def __init__(self, cfg: TrainConfig, start_step: int, total_steps: int, steps_per_epoch: int, history: list):
        self.out, self.every, self.total = Path(cfg.output_dir), cfg.logging_steps, total_steps
        self.steps_per_epoch, self.history = steps_per_epoch, history
        self.main, self.show_bar, self.start = dist.is_main(), cfg.tqdm, start_step
        self.metrics = self.trackers = self.bar = None
        self.postfix = {}
        if self.main:
            path = self.out / "metrics.jsonl"
            if start_step == 0:
                path.unlink(missing_ok=True)              # a fresh run in a used output_dir
            else:
                truncate_metrics(path, start_step)        # a resumed run logs the later steps again
            self.metrics = open(path, "a")
            self.trackers = Trackers(cfg, resumed=start_step > 0)
        self._reset()

    def note(self, msg: str) -> None:
        """A console line from rank 0 that does not break the progress bar."""
        if self.main:
            (self.bar.write if self.bar is not None else print)(msg)

    def _reset(self):
        self.loss, self.tokens, self.seen, self.t0 = 0.0, 0, 0, time.time()

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (an evaluation) that tokens_per_s must not count."""
        self.t0 += seconds

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
            rec = finite(rec)                   # the history goes into checkpoints' meta.json: JSON too
            self.history.append(rec)
            if self.main:
                self.metrics.write(json_line(rec))
                self.metrics.flush()
                self.trackers.log({f"train/{k}": rec.get(k) for k in ("loss", "lr", "grad_norm", "tokens_per_s",
                                                                     "peak_mem_gb")}, done)
                if self.bar is None:
                    print(json.dumps(rec), flush=True)
            self.postfix.update(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            self._reset()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self.postfix)

    def eval(self, step: int, when: str, res: dict) -> None:
        """One evaluation ("before", "step", "after"): metrics.jsonl, the trackers, the history, the bar."""
        rec = eval_record(step, when, res)
        self.history.append(rec)
        self.postfix.update({k: f"{rec[k]:.4f}" for k in EVAL_SCALARS if rec.get(k) is not None})
        if self.main:
            self.metrics.write(json_line(rec))
            self.metrics.flush()
            self.trackers.log({f"eval/{k}": rec.get(k) for k in EVAL_SCALARS}, step)
            self.note((f"eval at step {step}" if when == "step" else f"eval {when}") + f": {summary(res)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics:
            self.metrics.close()
            self.trackers.close()


def eval_record(step: int, when: str, res: dict) -> dict:
    """The metrics.jsonl record of an evaluation: its scores (not the examples)."""
    return finite({"step": step, "eval": when, **{k: v for k, v in res.items() if k != "examples"}})


def log_eval(out: Path, step: int, when: str, res: dict) -> None:
    """One metrics.jsonl record for an evaluation outside the loop (a resumed run's missing "after").
    Rank 0 only."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json_line(eval_record(step, when, res)))


def write_eval(out: Path, before: dict | None, after: dict | None) -> None:
    """eval.json = {"before", "after"}, replaced atomically. Rank 0 only."""
    write_text_atomic(out / "eval.json", json.dumps({"before": before, "after": after}, indent=2))


def eval_after(out: Path, run_eval, before: dict | None, step: int, record, res: dict | None = None) -> None:
    """The evaluation after training (collective), into eval.json, predictions/after.jsonl and
    `record(step, "after", scores)` (metrics.jsonl, trackers). `res`: the scores of the periodic
    evaluation already made at this step, whose predictions (step-N.jsonl) are the ones after training."""
    if res is None:
        after = run_eval("after")
    else:
        after = res
        if dist.is_main():
            preds = out / "predictions"
            write_atomic(preds / "after.jsonl", lambda p: shutil.copyfile(preds / f"step-{step}.jsonl", p))
    record(step, "after", after)
    if dist.is_main():
        write_eval(out, before, after)


def truncate_metrics(path: Path, step: int, drop: tuple = ()) -> None:
    """Keep the records up to `step`, but evaluations of the kinds in `drop`; a line cut by a crash is
    dropped, and one written with NaN (by an older version) is rewritten as strict JSON."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            if rec.get("step", 0) <= step and rec.get("eval") not in drop:
                kept.append(json_line(rec))
        except (ValueError, AttributeError):
            continue
    write_text_atomic(path, "".join(kept))     # a kill here loses nothing


# colours of the curves (matplotlib and the Pillow fallback alike)
CURVES = {"train loss": "#1f77b4", "validation loss": "#ff7f0e", "accuracy": "#2ca02c", "ANLS": "#9467bd"}


def plot_panels(history: list[dict]) -> list[tuple[str, dict]]:
    """loss.png's panels as (y label, {curve: [(step, value)]}): the training loss per token with the
    validation loss beside it, and with periodic evaluations the task metric over steps."""
    def curve(key, evals_only=False):
        return [(m["step"], m[key]) for m in history
                if m.get(key) is not None and (not evals_only or "eval" in m)]
    panels = [("loss (per token)", {"train loss": curve("loss"), "validation loss": curve("val_loss")})]
    if any(m.get("eval") == "step" for m in history):
        panels.append(("task metric", {"accuracy": curve("accuracy", True), "ANLS": curve("anls", True)}))
    return [(label, {k: v for k, v in curves.items() if v}) for label, curves in panels]


def plot_loss(history: list[dict], path: Path) -> None:
    """loss.png (plot_panels): matplotlib when installed, else a plain Pillow line plot."""
    panels = plot_panels(history)
    if not panels[0][1].get("train loss"):
        return
    if importlib.util.find_spec("matplotlib"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (label, curves) in zip(axes[0], panels):
            for name, pts in curves.items():
                ax.plot(*zip(*pts), label=name, color=CURVES[name], marker="o" if len(pts) < 20 else None)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(label)
            ax.legend()
        fig.tight_layout()
        write_atomic(path, lambda p: fig.savefig(p, format="png"))
        plt.close(fig)
        return
    from PIL import Image, ImageDraw
    w, h, m = 640, 400, 40
    im = Image.new("RGB", (w * len(panels), h), "white")
    d = ImageDraw.Draw(im)
    for k, (label, curves) in enumerate(panels):
        draw_panel(d, k * w, w, h, m, label, curves)
    write_atomic(path, lambda p: im.save(p, format="PNG"))


def draw_panel(d, left: int, w: int, h: int, m: int, label: str, curves: dict) -> None:
    """One panel of the Pillow fallback: every curve in its colour on shared axes, a legend line."""
    pts = [p for c in curves.values() for p in c]
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    sx = (w - 2 * m) / max(x1 - x0, 1)
    sy = (h - 2 * m) / max(y1 - y0, 1e-9)
    d.rectangle([left + m, m, left + w - m, h - m], outline="black")
    legend = []
    for name, c in curves.items():
        xy = [(left + m + (x - x0) * sx, h - m - (y - y0) * sy) for x, y in c]
        d.line(xy if len(xy) > 1 else [(left + m, xy[0][1]), (left + w - m, xy[0][1])], fill=CURVES[name], width=2)
        for x, y in xy:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=CURVES[name])
        legend.append(f"{name} {c[0][1]:.3f} -> {c[-1][1]:.3f}")
    d.text((left + m, 8), f"{label}: " + "; ".join(legend), fill="black")
    d.text((left + 4, m), f"{y1:.2f}", fill="black")
    d.text((left + 4, h - m - 10), f"{y0:.2f}", fill="black")
    d.text((left + m, h - m + 6), str(x0), fill="black")
    d.text((left + w - m - 20, h - m + 6), str(x1), fill="black")
    d.text((left + w // 2 - 40, h - m + 6), "optimizer step", fill="black")


def write_model(cfg: TrainConfig, model: Phi3V, proc: Processor, out: Path) -> None:
    """The trained model as users load it: the peft adapter (LoRA/QLoRA) or the HF-layout checkpoint
    (--full), with the processor files."""
    proc.save_pretrained(out)
    if cfg.mode == "full":
        model.save_pretrained(out)
    else:
        save_adapter(model, out, base_model_name_or_path=cfg.model)


BEST, BEST_JSON = "best", "best.json"


class Best:
    """--save_best: the best evaluation so far (step, value) and how many came after it (--early_stopping).

    Higher is better for accuracy and ANLS, lower for val_loss; only a strictly better, finite value
    counts. A resumed run starts from best.json when it describes a step the checkpoint had reached,
    else from the evaluations in the checkpoint's history, so it decides as the uninterrupted run did."""

    def __init__(self, cfg: TrainConfig, history: list, start_step: int):
        self.metric, self.patience = cfg.save_best, cfg.early_stopping
        self.step = self.value = None
        self.since = 0
        for rec in history:                 # the evaluations up to the checkpoint, in order
            if rec.get("eval") == "step" and rec["step"] <= start_step:
                self.update(rec["step"], rec)
        saved = read_best(Path(cfg.output_dir))
        if saved and saved.get("metric") == self.metric and saved.get("step", start_step + 1) <= start_step:
            self.step, self.value = saved["step"], saved["value"]

    def update(self, step: int, res: dict) -> bool:
        """Account an evaluation; True if it is the new best."""
        v = res.get(self.metric)
        if v is not None and math.isfinite(v) and (
                self.value is None or (v < self.value if self.metric == "val_loss" else v > self.value)):
            self.step, self.value, self.since = step, v, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.since >= self.patience


def read_best(out: Path) -> dict | None:
    """best/best.json, or None. Rank 0 first finishes a swap a kill interrupted (recover_best); the
    other ranks do not touch the files and read the previous best where it lies meanwhile."""
    if dist.is_main():
        recover_best(out)
    for d in (BEST, ".old-best"):
        try:
            return json.loads((out / d / BEST_JSON).read_text())
        except (OSError, ValueError):
            continue
    return None


def recover_best(out: Path) -> None:
    """A kill between save_best's two renames leaves the previous best as .old-best/: put it back."""
    final, old = out / BEST, out / ".old-best"
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def save_best(cfg: TrainConfig, model: Phi3V, proc: Processor, step: int, metric: str, value: float) -> Path:
    """output_dir/best/: the model (write_model) and best.json {"step", "metric", "value"}, replacing the
    previous best whole or not at all: written into .tmp-best/, then swapped in by two renames (a kill
    between them leaves the previous best as .old-best/, which recover_best puts back). Rank 0 only."""
    out = Path(cfg.output_dir)
    final, tmp, old = out / BEST, out / ".tmp-best", out / ".old-best"
    recover_best(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(cfg, model, proc, tmp)
    write_text_atomic(tmp / BEST_JSON, json.dumps({"step": step, "metric": metric, "value": value}) + "\n")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def export(cfg: TrainConfig, model: Phi3V, proc: Processor, history: list, log) -> None:
    """The final model (peft adapter, or HF layout for --full), processor files, loss.png, and with
    --merge the adapter folded into the unquantised base under merged/. Rank 0 only."""
    out = Path(cfg.output_dir)
    write_model(cfg, model, proc, out)
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


def diverged(cfg: TrainConfig, step: int, what: str) -> ValueError:
    """The error that stops a run whose training went non-finite at optimizer step `step` (no evaluation
    or export follows): what happened, what to try, where to resume."""
    tips = [f"a lower --learning_rate (this run: {cfg.learning_rate:g})",
            f"a smaller --max_grad_norm (this run: {cfg.max_grad_norm:g})" if cfg.max_grad_norm
            else "--max_grad_norm 1 (clipping is off)"]
    if not cfg.fp32:
        tips.append("--fp32" if cfg.bf16 else "--bf16 (or --fp32)")
    ck = next((c for c in complete_checkpoints(cfg.output_dir) if int(c.name.split("-")[1]) < step), None)
    where = (f"resume from the newest checkpoint, {ck} (--resume), or an earlier one (--resume DIR)" if ck
             else "start again (no checkpoint was written before it)")
    return ValueError(f"step {step}: {what}. Training stopped; try {', '.join(tips[:-1])} or {tips[-1]}, "
                      f"then {where}")


# ------------------------------------------------------------------------------------------------
def make_evaluator(cfg: TrainConfig, model: Phi3V, proc: Processor, device: torch.device, log):
    """`run_eval(when)` -> scores of the eval split with this run's settings (None without an eval
    file): the task metric by generation on its first --max_generate_samples (default
    --max_eval_samples) records and, with --eval_steps, the validation loss. Every record's prediction
    goes to output_dir/predictions/<when>.jsonl (rank 0; `when`: "before", "step-N", "after",
    "eval_only"), before the caller records the scores. Collective."""
    if not cfg.eval_file:
        return None
    records = load_eval_records(cfg.eval_file, cfg.max_generate_samples or cfg.max_eval_samples)
    val, n = None, 0
    if cfg.eval_steps:
        val = JsonlDataset(cfg.eval_file, proc, max_length=cfg.max_length, on_too_long="drop",
                           on_bad_record="skip" if cfg.skip_bad_records else "error",
                           progress=progress_bar(cfg, "indexing " + Path(cfg.eval_file).name),
                           cache_dir=index_cache_dir(cfg))
        n = min(len(val), cfg.max_eval_samples or len(val))
        log(f"validation loss: {n} samples of {cfg.eval_file}, generation: {len(records)} records, "
            f"every {cfg.eval_steps} steps")

    def run_eval(when: str) -> dict:
        res = {"val_loss": validation_loss(cfg, model, val, n, proc.pad_token_id, device)} if val else {}
        res.update(evaluate(model, proc, records, Path(cfg.eval_file).parent / "images",
                            batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                            with_anls=TASKS[cfg.task].anls, num_workers=cfg.num_workers,
                            progress=progress_bar(cfg, f"eval {when}")))
        predictions = res.pop("predictions")
        if dist.is_main():
            write_predictions(cfg.output_dir, when, predictions)
        return res
    return run_eval


@torch.no_grad()
def validation_loss(cfg: TrainConfig, model: Phi3V, ds: JsonlDataset, n: int, pad_id: int,
                    device: torch.device) -> float | None:
    """Token-weighted mean cross-entropy of the supervised tokens of the first n samples of `ds`: the
    training forward (`training_loss`) in eval mode (no dropout) without autograd, in micro-batches of
    similar lengths dealt round-robin to the ranks, summed over ranks. It draws from no global random
    stream (the loader has its own generator), so training continues exactly as without it."""
    micro = length_batches(ds.lengths[:n].tolist(), cfg.micro_batch_size)       # longest first
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=micro[dist.rank()::dist.world_size()],
        collate_fn=functools.partial(collate, pad_id=pad_id, pack=cfg.packing), num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)      # loss, supervised tokens
    for batch in loader:
        if batch["n_samples"]:
            sums[0] += model.training_loss(to_device(batch, device)).double()
            sums[1] += batch["n_targets"]
    model.train(was_training)
    loss, tokens = dist.all_reduce_sum(sums).tolist()
    return loss / tokens if tokens else None


def summary(res: dict) -> str:
    return (f"val_loss {res['val_loss']:.4f}, " if res.get("val_loss") is not None else "") \
        + f"accuracy {res['accuracy']:.3f}" + (f", ANLS {res['anls']:.3f}" if "anls" in res else "")


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
    run_eval = make_evaluator(cfg, model, proc, device, log)
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
    start_step, history, stopped = resume(cfg, opt, scaler, total_steps, log) if cfg.resume else (0, [], False)
    if start_step >= total_steps or stopped:     # finished training; the evaluation and export may be missing
        complete_run(cfg, model, proc, run_eval, history, start_step, log)
        return dist.cleanup()
    run_log = RunLog(cfg, start_step, total_steps, sampler.steps_per_epoch, history)
    best = Best(cfg, history, start_step) if cfg.save_best else None
    # the eval before training runs once; a resumed run keeps it from eval.json
    before = json.loads(eval_path.read_text()).get("before") if start_step and eval_path.exists() else None
    if run_eval and before is None:
        before = run_eval("before")
        run_log.eval(start_step, "before", before)
        if main_rank:
            write_eval(out, before, None)
    last_eval = None             # (step, scores) of the newest periodic evaluation

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
        if not math.isfinite(g_loss):        # all-reduced: every rank stops here alike
            opt.discard()
            raise diverged(cfg, step + 1, f"the training loss is {g_loss} (the step was not applied)")
        gnorm = opt.step(grad_scale=1.0 / max(g_tok, 1.0) / scaler.scale)   # clip, AdamW, write back
        opt.zero_grad()
        overflow = scaler.update(gnorm)      # fp16: an inf/nan norm skipped the step, halve the scale
        if not math.isfinite(gnorm) and (not overflow or scaler.stuck):      # no loss scale to blame
            raise diverged(cfg, step + 1, f"the gradient norm is {gnorm}" + (
                f" with the fp16 loss scale at its floor, {scaler.min_scale:g}" if overflow else "")
                + " (the step was not applied)")
        done = step + 1
        run_log.step(done, g_loss, int(g_tok), int(g_seen), opt.lr, gnorm, overflow, skipped)
        stop = False
        if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == total_steps):
            t0 = time.time()
            last_eval = (done, run_eval(f"step-{done}"))
            run_log.eval(done, "step", last_eval[1])
            if best is not None:
                if best.update(done, last_eval[1]) and main_rank:
                    path = save_best(cfg, model, proc, done, best.metric, best.value)
                    run_log.note(f"best {best.metric} so far ({best.value:.4f}) -> {path}")
                stop = best.stop
            run_log.exclude(time.time() - t0)       # tokens_per_s counts training only
        if (cfg.save_steps and done % cfg.save_steps == 0) or done == total_steps or stop:
            if not opt.all_finite():        # collective; a finite step can still overflow the weights
                raise diverged(cfg, done, "the weights or optimizer state after it are not finite (inf or "
                               "nan), so its checkpoint was not written")
            meta = {"total_steps": total_steps, "config": dataclasses.asdict(cfg), "history": run_log.history,
                    "world_size": world, "scaler": scaler.state_dict() if cfg.fp16 else None,
                    "early_stopped": stop}
            path = save_checkpoint(out, done, {n: p.detach() for n, p in named}, opt.state_dict(), meta,
                                   keep_last=cfg.keep_checkpoints, rank_state=rng_state())
            run_log.note(f"checkpoint {path}")
        if stop:
            run_log.note(f"early stopping at step {done}: {best.metric} has not improved for {best.since} "
                         f"evaluations (best {best.value:.4f} at step {best.step}, in {out / BEST})")
            break

    if run_eval:     # the evaluation at the last step, if there was one, is the one after training
        eval_after(out, run_eval, before, done, run_log.eval,
                   last_eval[1] if last_eval and last_eval[0] == done else None)
    run_log.close()
    if main_rank:
        export(cfg, model, proc, run_log.history, log)
        log(f"done: {out}")
    dist.cleanup()


if __name__ == "__main__":
    with cli.errors("train.py"):     # one line `train.py: error: ...`; PHI3V_DEBUG=1 for the traceback
        main(parse_args())
