"""Fine-tune Phi-3.5-vision: full, frozen-vision, LoRA or QLoRA; one process or torchrun.

    python train.py --task demo                                   # offline, CPU, a few minutes
    torchrun --nproc_per_node=4 train.py --task ucf101 --data_dir DIR --lora --bf16

The loop is written out in order: config -> distributed init -> processor/model -> quantise/LoRA ->
data -> optimizer -> resume -> eval before -> (micro-steps, optimizer step, log, checkpoint)* ->
eval after -> export. Everything it calls is a plain function or module from phi3v/.
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

import numpy as np
import torch

from phi3v import Phi3V, Processor, dist
from phi3v.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from phi3v.data import JsonlDataset, StepBatchSampler, StepSampler, collate
from phi3v.evaluate import generate_answers, load_eval_records, score
from phi3v.lora import apply_lora, load_adapter, lora_parameters, merge_lora, save_adapter
from phi3v.loss import chunked_ce
from phi3v.nf4 import quantize_nf4
from phi3v.optim import DynamicLossScaler, ZeroAdamW, lr_at

LM_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2"]

# task -> (train file, eval file, num_crops, ANLS) relative to --data_dir (the converters' names)
TASKS = {
    "ucf101": ("ucf101_train.jsonl", "ucf101_val.jsonl", 4, False),
    "docvqa": ("docvqa_train.jsonl", "docvqa_val.jsonl", 16, True),
    "hateful_memes": ("hateful_memes_train.jsonl", "hateful_memes_val.jsonl", 16, False),
    "nlvr2": ("nlvr2_train.jsonl", "nlvr2_val.jsonl", 16, False),
    "jsonl": (None, None, 4, False),
    "demo": ("ucf101_train.jsonl", "ucf101_val.jsonl", 1, False),
}


@dataclass
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
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and compute"})
    fp16: bool = field(default=False, metadata={"help": "fp16 compute with dynamic loss scaling"})
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
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient norm clip"})
    num_crops: int | None = field(default=None, metadata={"help": "HD crops per image (preset default)"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)"})
    lora_alpha_ratio: float | None = field(default=None, metadata={"help": "alpha = round(rank x ratio)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute decoder blocks in backward"})
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


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

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
        if f.type in ("bool", bool):
            if f.name == "tqdm":
                p.add_argument("--tqdm", dest="tqdm", action="store_true", default=True, help=kw["help"])
                p.add_argument("--no_tqdm", "--no-tqdm", dest="tqdm", action="store_false")
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
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    return resolve(cfg, error)


def resolve(cfg: TrainConfig, error) -> TrainConfig:
    """Fill the preset defaults and reject contradictions with a one-line message."""
    if cfg.use_flash_attention:
        cfg.bf16 = True          # the recipe's flash path is bf16; SDPA picks flash kernels itself
    if cfg.bf16 and cfg.fp16:
        error("--bf16 and --fp16 are exclusive")
    if cfg.mode is None:
        cfg.mode = "lora"        # the recipe's common case, and the demo's
    if cfg.mode == "full" and (cfg.lora_alpha or cfg.lora_alpha_ratio or cfg.lora_dropout):
        error("--lora_alpha/--lora_alpha_ratio/--lora_dropout need --lora or --qlora, not --full")
    train_f, eval_f, crops, _ = TASKS[cfg.task]
    if cfg.task == "jsonl":
        if not cfg.train_file and not (cfg.eval_only and cfg.eval_file):
            error("--task jsonl needs --train_file (and optionally --eval_file)")
    elif cfg.task != "demo":
        if not cfg.data_dir:
            error(f"--task {cfg.task} needs --data_dir (a folder written by python -m convert.{cfg.task})")
        if not Path(cfg.data_dir).is_dir():
            error(f"--data_dir {cfg.data_dir} does not exist")
        cfg.train_file = cfg.train_file or str(Path(cfg.data_dir) / train_f)
        cfg.eval_file = cfg.eval_file or str(Path(cfg.data_dir) / eval_f)
    for f in (cfg.train_file, cfg.eval_file):
        if f and not Path(f).is_file() and not (cfg.eval_only and f == cfg.train_file):
            error(f"data file {f} does not exist")
    cfg.num_crops = cfg.num_crops or crops
    if cfg.num_crops < 1 or cfg.num_crops > 16:
        error(f"--num_crops must be 1..16, got {cfg.num_crops}")
    if cfg.task == "demo":
        cfg.output_dir = cfg.output_dir or "output/demo"
        d = {"batch_size": 8, "learning_rate": None, "warmup_steps": 4, "num_train_epochs": 4.0,
             "logging_steps": 2, "max_new_tokens": 8, "eval_batch_size": 4, "num_workers": 1,
             "micro_batch_size": 2, "lora_rank": 16}
        for k, v in d.items():   # demo defaults unless the user set the flag
            if getattr(cfg, k) == TrainConfig.__dataclass_fields__[k].default:
                setattr(cfg, k, v)
    cfg.output_dir = cfg.output_dir or f"output/{cfg.task}"
    if cfg.learning_rate is None:
        cfg.learning_rate = {"full": 4e-5}.get(cfg.mode, 2e-4) if cfg.task != "demo" else 5e-3
    if cfg.lora_alpha is None:
        cfg.lora_alpha = round(cfg.lora_rank * cfg.lora_alpha_ratio) if cfg.lora_alpha_ratio else 2 * cfg.lora_rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (cfg.micro_batch_size * world):
        error(f"--batch_size {cfg.batch_size} is not divisible by --micro_batch_size {cfg.micro_batch_size} "
              f"x world size {world}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        error("--max_steps must be >= 1")
    return cfg


# ------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Phi3V:
    """Load -> quantise (QLoRA) -> LoRA / freezing -> activation checkpointing."""
    model = Phi3V.from_pretrained(cfg.model, dtype=dtype, device=device)
    model.requires_grad_(cfg.mode == "full")
    if cfg.mode == "qlora":   # NF4 for the decoder and CLIP linears (the recipe's bnb: all but lm_head)
        quantize_nf4(model, targets=LM_TARGETS + ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    if cfg.mode in ("lora", "qlora"):
        torch.manual_seed(cfg.seed)          # adapter init is part of the run's determinism
        if cfg.adapter:
            load_adapter(model, cfg.adapter)
        else:
            targets = LM_TARGETS + ["lm_head"] + ([] if cfg.freeze_vision else VISION_TARGETS)
            apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=targets, init="gaussian")
        for p in lora_parameters(model):     # also for an adapter loaded to continue training
            p.requires_grad_(True)
    if cfg.freeze_vision:
        model.vision.requires_grad_(False)
        model.vision.frozen = True           # runs without building an autograd graph
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.vision.clip.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def no_decay(name: str, p: torch.Tensor) -> bool:
    """The HF Trainer rule: no decay for biases and norm weights (LayerNorm and RMSNorm here)."""
    return name.endswith("bias") or "norm" in name.rsplit(".", 2)[-2] or p.dim() < 2


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def evaluate(model, proc, cfg: TrainConfig, records, images_dir, show: bool) -> dict:
    """Greedy generation on this rank's share of the records; results gathered to every rank."""
    mine = records[dist.rank()::dist.world_size()]
    bar = None
    if show and cfg.tqdm:
        from tqdm import tqdm
        bar = functools.partial(tqdm, desc="eval", leave=False)
    res = generate_answers(model, proc, mine, images_dir, cfg.eval_batch_size, cfg.max_new_tokens, bar)
    if dist.world_size() > 1:
        parts = [None] * dist.world_size()
        torch.distributed.all_gather_object(parts, res)
        res = [r for part in parts for r in part]
    out = score(res, with_anls=TASKS[cfg.task][3])
    out["examples"] = res[:5]
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run logs the later steps again); a line cut by a
    crash is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


def log_eval(out: Path, step: int, when: str, res: dict) -> None:
    """One metrics.jsonl record per evaluation."""
    rec = {"step": step, "eval": when, **{k: v for k, v in res.items() if k != "examples"}}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


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
        fig.savefig(path)
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
    im.save(path)


# ------------------------------------------------------------------------------------------------
def main(cfg: TrainConfig) -> None:
    device = dist.init()
    rank, world, main_rank = dist.rank(), dist.world_size(), dist.is_main()
    if device.type == "cpu":
        # an explicit OMP_NUM_THREADS wins; else share the cores between the local ranks
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else
                              max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    out = Path(cfg.output_dir)
    log = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)

    # the demo writes its own tiny model and dataset (no downloads, nothing outside the package)
    if cfg.task == "demo":
        from phi3v import demo
        data_dir = Path(cfg.data_dir or out / "demo_data")
        if cfg.model == TrainConfig.model:
            cfg.model = str(out / "demo_model")
        if main_rank:
            if not (Path(cfg.model) / "config.json").exists():
                demo.write_base_model(cfg.model, seed=0, num_crops=cfg.num_crops)
            if not (data_dir / "ucf101_train.jsonl").exists():
                demo.write_dataset(data_dir)
        dist.barrier()
        cfg.train_file, cfg.eval_file = str(data_dir / TASKS["demo"][0]), str(data_dir / TASKS["demo"][1])
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    proc = Processor.from_pretrained(cfg.model, num_crops=cfg.num_crops)
    model = build_model(cfg, device, dtype)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model {cfg.model}: mode {cfg.mode}{' (vision frozen)' if cfg.freeze_vision else ''}, {dtype}, "
        f"{n_train:,} trainable parameters, world size {world}, device {device}")
    out.mkdir(parents=True, exist_ok=True)
    eval_path = out / "eval.json"

    eval_records = None
    if cfg.eval_file:
        eval_records = load_eval_records(cfg.eval_file, cfg.max_eval_samples)
        eval_images = Path(cfg.eval_file).parent / "images"
    if cfg.eval_only:
        if eval_records is None:
            raise ValueError("--eval_only needs an eval split (--eval_file or the preset's val file)")
        res = evaluate(model, proc, cfg, eval_records, eval_images, main_rank)
        if main_rank:
            # nothing is trained: the model before and after is the one evaluated
            eval_path.write_text(json.dumps({"before": res, "after": res}, indent=2))
            log(f"eval: {json.dumps({k: v for k, v in res.items() if k != 'examples'})} -> {eval_path}")
        dist.cleanup()
        return

    # --- data -----------------------------------------------------------------------------------
    progress = None
    if main_rank and cfg.tqdm:
        from tqdm import tqdm
        progress = functools.partial(tqdm, desc="reading " + Path(cfg.train_file).name, leave=False)
    train_ds = JsonlDataset(cfg.train_file, proc, max_length=cfg.max_length,
                            on_too_long="drop" if cfg.drop_too_long else "error",
                            on_bad_record="skip" if cfg.skip_bad_records else "error", progress=progress)
    log(f"train: {len(train_ds)} samples from {cfg.train_file}"
        + (f"; skipped {len(train_ds.skipped)} malformed records" if train_ds.skipped else "")
        + (f"; dropped {len(train_ds.dropped)} samples longer than {cfg.max_length} tokens" if train_ds.dropped else ""))
    for s in train_ds.skipped[:5]:
        log(f"  skipped: {s}")
    sampler = StepSampler(train_ds.lengths, cfg.batch_size, cfg.micro_batch_size, rank, world, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * sampler.steps_per_epoch))

    # --- optimizer ------------------------------------------------------------------------------
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ZeroAdamW(named, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, no_decay=no_decay,
                    max_grad_norm=cfg.max_grad_norm)
    scaler = DynamicLossScaler() if cfg.fp16 else None

    # --- resume ---------------------------------------------------------------------------------
    start_step, history = 0, []
    if cfg.resume:
        ck = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if ck is None:
            log(f"--resume: no complete checkpoint under {out / 'checkpoints'}, starting from scratch")
        else:
            _, optim_states, meta = load_checkpoint(ck, weights=False)
            opt.load_sharded(optim_states)   # re-partitions for this world size; writes the params
            start_step = meta["step"]
            history = meta.get("history", [])
            if scaler is not None and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            if meta.get("world_size") == world and len(meta["rank_states"]) == world:
                set_rng_state(meta["rank_states"][rank])   # dropout continues bit-exactly
            log(f"resumed from {ck} at step {start_step}/{total_steps}")
            if start_step >= total_steps:
                log(f"this run already finished ({start_step} steps); nothing to do")
                dist.cleanup()
                return
            if main_rank:
                truncate_metrics(out / "metrics.jsonl", start_step)
    if start_step == 0 and main_rank:
        (out / "metrics.jsonl").unlink(missing_ok=True)    # a fresh run in a used output_dir

    # --- evaluate before training (kept across resumes in eval.json) ------------------------------
    before = None
    if eval_path.exists() and start_step > 0:
        before = json.loads(eval_path.read_text()).get("before")
    if eval_records is not None and before is None:
        before = evaluate(model, proc, cfg, eval_records, eval_images, main_rank)
        log(f"eval before: accuracy {before['accuracy']:.3f}" + (f", ANLS {before['anls']:.3f}" if "anls" in before else ""))
        if main_rank:
            eval_path.write_text(json.dumps({"before": before, "after": None}, indent=2))
            log_eval(out, start_step, "before", before)

    # --- the loop -------------------------------------------------------------------------------
    # own generator: iter(loader) draws a worker seed, which must not advance the global RNG that
    # dropout uses (a resumed run restores that RNG and would otherwise be one draw ahead)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatchSampler(sampler, start_step, total_steps),
        collate_fn=functools.partial(collate, pad_id=proc.pad_token_id, pack=cfg.packing),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)
    metrics_f = open(out / "metrics.jsonl", "a") if main_rank else None
    tb = None
    if main_rank and importlib.util.find_spec("tensorboard"):
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tensorboard"))
    bar = None
    if main_rank and cfg.tqdm:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
    model.train()
    log_loss, log_tok, log_t0, log_tokens_seen, skipped_total = 0.0, 0, time.time(), 0, 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, total_steps, cfg.lr_schedule)
        opt.lr = lr
        loss_sum, n_tok, n_seen = 0.0, 0, 0
        micro = sampler.micro_batches(step)
        for i in range(len(micro)):
            batch = next(batches)
            skipped_total += len(batch["skipped"])
            if batch["n_samples"] == 0:
                continue
            h = model.hidden_packed(batch["input_ids"].to(device), batch["doc_ids"].to(device),
                                    pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(device),
                                    image_sizes=batch["image_sizes"])
            loss, n = chunked_ce(h, model.lm_head, batch["labels"])
            opt.sync_grads = i == len(micro) - 1    # the last backward also reduces the gradients over ranks
            (loss * (scaler.scale if scaler else 1.0)).backward()
            loss_sum += loss.item()
            n_tok += n
            n_seen += int(batch["input_ids"].numel())
        # normalise by the global number of supervised tokens of this optimizer step
        counts = dist.all_reduce_sum(torch.tensor([loss_sum, n_tok, n_seen], dtype=torch.float64, device=device))
        g_loss, g_tok, g_seen = counts.tolist()
        scale = 1.0 / max(g_tok, 1.0) / (scaler.scale if scaler else 1.0)
        gnorm = opt.step(grad_scale=scale)
        opt.zero_grad()
        overflow = scaler.update(gnorm) if scaler else False
        log_loss += g_loss
        log_tok += int(g_tok)
        log_tokens_seen += int(g_seen)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total_steps:
            dt = time.time() - log_t0
            rec = {"step": done, "loss": log_loss / max(log_tok, 1), "lr": lr,
                   "grad_norm": gnorm if math.isfinite(gnorm) else None,   # strict JSON: no NaN/inf
                   "tokens_per_s": log_tokens_seen / dt, "epoch": done / sampler.steps_per_epoch,
                   "skipped_samples": skipped_total}
            if overflow:
                rec["fp16_overflow_skipped"] = True
            history.append(rec)
            if main_rank:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
                if tb:
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        if rec[k] is not None:
                            tb.add_scalar(f"train/{k}", rec[k], done)
            if bar is None:
                log(json.dumps(rec))
            log_loss, log_tok, log_t0, log_tokens_seen = 0.0, 0, time.time(), 0
        if bar is not None:
            bar.update(1)
            if history:
                h_ = history[-1]
                bar.set_postfix(loss=f"{h_['loss']:.4f}", lr=f"{h_['lr']:.2e}", tok_s=f"{h_['tokens_per_s']:.0f}")
        if (cfg.save_steps and done % cfg.save_steps == 0) or done == total_steps:
            meta = {"total_steps": total_steps, "config": dataclasses.asdict(cfg), "history": history,
                    "world_size": world, "scaler": scaler.state_dict() if scaler else None}
            trainable = {n: p.detach() for n, p in named}
            path = save_checkpoint(out, done, trainable, opt.state_dict(), meta, keep_last=cfg.keep_checkpoints,
                                   rank_state=rng_state())
            if bar is None:
                log(f"checkpoint {path}")
    if bar is not None:
        bar.close()
    if metrics_f:
        metrics_f.close()

    # --- evaluate after training, export ---------------------------------------------------------
    if eval_records is not None:
        after = evaluate(model, proc, cfg, eval_records, eval_images, main_rank)
        log(f"eval after: accuracy {after['accuracy']:.3f}" + (f", ANLS {after['anls']:.3f}" if "anls" in after else ""))
        if main_rank:
            eval_path.write_text(json.dumps({"before": before, "after": after}, indent=2))
            log_eval(out, total_steps, "after", after)
    if main_rank:
        proc.save_pretrained(out)
        if cfg.mode == "full":
            model.save_pretrained(out)
        else:
            save_adapter(model, out, base_model_name_or_path=cfg.model)
        plot_loss(history, out / "loss.png")
        if cfg.merge:
            merged = out / "merged"
            if cfg.mode == "full":
                log("--merge with --full: the model in the output dir is already a full HF checkpoint")
            else:
                base = Phi3V.from_pretrained(cfg.model, dtype=dtype if dtype != torch.float16 else torch.float32)
                load_adapter(base, out)                      # onto the unquantised base (also for QLoRA)
                merge_lora(base)
                base.save_pretrained(merged)
                proc.save_pretrained(merged)
                log(f"merged model -> {merged}")
        log(f"done: {out}")
    dist.cleanup()


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"train.py: error: {e}\n")
        sys.exit(1)
