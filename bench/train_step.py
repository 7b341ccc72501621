"""Training-step throughput and memory: phi3v against the HF transformers + peft stack, same shapes.

    python bench/train_step.py                                          # GPU: everything, both impls
    python bench/train_step.py --modes lora,qlora --samples docvqa --recompute none --compile
    python bench/train_step.py --config tiny --device cpu --steps 1 --warmup 1   # CPU smoke run

Full-size Phi-3.5-vision shapes with random weights (nothing is downloaded). One sample per step
(micro-batch 1), one optimizer step per sample, as ../shared/reference/PERF.md measures:
  docvqa  one image at num_crops 16, image_sizes 1008x1680 = 3x5 crops + global = 16 real crops,
          2353 image tokens + 90 text = 2443 tokens, labels on a short answer;
  ucf     8 frames at num_crops 4 (672x672 = 2x2 crops + global), 8 x 757 image tokens + 60 text = 6116.
Modes: full (all trainable), full_frozen_vision, lora and qlora (LoRA r 64, alpha 128 on
qkv_proj/o_proj/gate_up_proj/down_proj, vision tower frozen, as PERF.md's baseline). The step is the
one train.py does: hidden_packed -> chunked_ce (sum) -> backward -> ZeroAdamW.step(1/n_tokens).

Each (impl, mode) runs in its own process (a crash or OOM there is recorded and the rest goes on),
which builds the model once and measures every sample: warm-up steps, then timed steps between
torch.cuda.synchronize() calls; peak memory is torch.cuda.max_memory_allocated since a
reset_peak_memory_stats() after the model and optimizer are built (so it counts weights, optimizer
state and activations). MFU = k * N * tokens / step time / 989e12 with N = 4,146,621,440 (k = 6 for
full fine-tuning, 4 for LoRA/QLoRA); on a tiny config N is that config's own parameter count and the
figure means nothing on CPU. The results JSON follows PERF.md "Results file".
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:      # `python bench/train_step.py` from a checkout, package not installed
    sys.path.insert(0, str(REPO))

import torch                                    # noqa: E402
import torch.nn as nn                           # noqa: E402

from phi3v import Phi3V, Phi3VConfig, memory   # noqa: E402
from phi3v.finetune import prepare   # noqa: E402
from phi3v.config import CLIP_LINEARS, LM_LINEARS, crop_grids   # noqa: E402
from phi3v.data import to_device                 # noqa: E402
from phi3v.nf4 import bnb_available             # noqa: E402
from phi3v.optim import ZeroAdamW, no_decay     # noqa: E402

N_REAL = 4_146_621_440        # Phi-3.5-vision's parameter count (PERF.md)
PEAK_FLOPS = 989e12           # H100 SXM dense bf16 (PERF.md's MFU denominator)
MODES = ("full", "full_frozen_vision", "lora", "qlora")
IMPLS = ("phi3v", "hf")
LM_TARGETS, CLIP_TARGETS = list(LM_LINEARS), list(CLIP_LINEARS)   # QLoRA quantises both, as train.py
LORA_RANK, LORA_ALPHA = 64, 128
LR = 1e-5                     # small: the weights are random, the step only has to be a real update
HF_NOTE = ("hf image path: CLIPVisionModel (clip_layers_used layers, last_hidden_state = hidden_states[-2]) "
           "on the real crops only, CLS dropped, 2x2 merge by reshape, then one learnable separator vector "
           "repeated to make up the HD transform's separator count (sub_GN/glb_GN), so the projector and the "
           "decoder see exactly the image-token count of phi3v; the crop stitching order is not reproduced "
           "(no effect on cost). Decoder: Phi3ForCausalLM(inputs_embeds, labels) with SDPA, full-vocab loss.")

# bench sample name -> the planner's task of the same shape (phi3v.memory.TASK_SAMPLES, PERF.md's samples)
SAMPLES = {"docvqa": "docvqa", "ucf": "ucf101"}


# ------------------------------------------------------------------------------------------------
# the synthetic sample
def make_sample(name: str, cfg: Phi3VConfig, seed: int = 0) -> dict:
    """One sample (micro-batch 1) as train.py's collator prepares it: input_ids [1, T] (image k's
    positions hold -k), labels on the last answer tokens, crops; the planner's `sample_batch`."""
    s = memory.sample_batch(cfg, SAMPLES[name], seed=seed)
    return {**s, "tokens": s["input_ids"].shape[1]}


# ------------------------------------------------------------------------------------------------
# phi3v
def build_phi3v(cfg: Phi3VConfig, mode: str, args, device: torch.device, dtype: torch.dtype):
    model = Phi3V.from_config(cfg, seed=args.seed, dtype=dtype, device=device)
    info = {"recompute": args.recompute, "compile": args.compile, "dtype": str(dtype).replace("torch.", ""),
            "vision_frozen": mode != "full", "offload_activations": args.offload_activations}
    # PERF.md's configurations: LoRA on the LM linears only, vision frozen except in mode full
    backend = args.nf4_backend
    if backend == "auto":
        backend = "bnb" if bnb_available() and device.type == "cuda" else "torch"
    prepare(model, "full" if mode.startswith("full") else mode, freeze_vision=mode != "full", lora_rank=LORA_RANK,
            lora_alpha=LORA_ALPHA, targets=LM_TARGETS, seed=args.seed, nf4_backend=backend)
    if mode == "qlora":
        info.update(nf4_backend=backend, nf4_targets=LM_TARGETS + CLIP_TARGETS, double_quant=True)
    if mode in ("lora", "qlora"):
        info.update(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=LM_TARGETS)
    model.configure_training(recompute=args.recompute, compile=args.compile,
                             offload_activations=args.offload_activations)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ZeroAdamW(named, lr=LR, weight_decay=0.01, no_decay=no_decay, max_grad_norm=1.0)
    info["optimizer"] = "phi3v.ZeroAdamW (fp32 master, world size 1)"
    info["trainable_params"] = sum(p.numel() for _, p in named)

    def step(s: dict) -> torch.Tensor:
        loss = model.training_loss(s)          # train.py's micro-step
        loss.backward()
        opt.step(grad_scale=1.0 / s["n_targets"])
        opt.zero_grad()
        return loss.detach() / s["n_targets"]

    return step, info, (model, opt)


# ------------------------------------------------------------------------------------------------
# the HF transformers + peft (+ bitsandbytes) baseline
class HFImageEmbed(nn.Module):
    """CLIP -> 2x2 merge -> (separators, approximated) -> 2-layer projector; see HF_NOTE."""

    def __init__(self, cfg: Phi3VConfig, clip: nn.Module):
        super().__init__()
        c4 = cfg.image_dim_out * 4
        self.clip = clip
        self.sep = nn.Parameter(0.5 * torch.randn(c4))
        d = cfg.hidden_size
        self.proj = nn.Sequential(nn.Linear(c4, d), nn.GELU(), nn.Linear(d, d))
        self.g = cfg.vision.grid // 2

    def forward(self, pixel_values, image_sizes, n_tokens: int) -> torch.Tensor:
        crops = crop_grids(image_sizes)
        real = torch.cat([pixel_values[i, : 1 + hc * wc] for i, (hc, wc) in enumerate(crops)])
        f = self.clip(pixel_values=real).last_hidden_state[:, 1:]          # [N, G*G, C]
        n, _, c = f.shape
        g = self.g
        f = f.reshape(n, g, 2, g, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n * g * g, 4 * c)
        f = torch.cat([f, self.sep.to(f.dtype).expand(n_tokens - f.shape[0], -1)])
        return self.proj(f)


def hf_configs(cfg: Phi3VConfig):
    import transformers
    hcfg = transformers.Phi3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.original_max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "longrope", "rope_theta": cfg.rope_theta,
                         "short_factor": list(cfg.rope_short_factor), "long_factor": list(cfg.rope_long_factor)},
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.pad_token_id, tie_word_embeddings=False,
        use_cache=False)
    v = cfg.vision
    vcfg = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=cfg.clip_layers_used,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps)
    for c in (hcfg, vcfg):
        c._attn_implementation = "sdpa"
    return hcfg, vcfg


def to_bnb_4bit(module: nn.Module, targets: list[str], device: torch.device) -> int:
    """Swap matching nn.Linears for bitsandbytes Linear4bit (NF4, double quant, bf16 compute)."""
    import bitsandbytes as bnb
    swaps = [(n, m) for n, m in module.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    for name, lin in swaps:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(torch.bfloat16), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(device)                   # quantises here
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, q)
    return len(swaps)


def build_hf(cfg: Phi3VConfig, mode: str, args, device: torch.device, dtype: torch.dtype):
    import transformers
    hcfg, vcfg = hf_configs(cfg)
    # full fine-tuning keeps fp32 weights (the master copy) under bf16 autocast; (Q)LoRA a bf16 base
    wdtype = torch.float32 if mode in ("full", "full_frozen_vision") else dtype
    torch.manual_seed(args.seed)
    with torch.device(device):
        lm = transformers.Phi3ForCausalLM(hcfg).to(wdtype)
        vision = HFImageEmbed(cfg, transformers.CLIPVisionModel(vcfg)).to(wdtype)
    info = {"recompute": args.recompute, "compile": False, "dtype": str(wdtype).replace("torch.", ""),
            "autocast": str(dtype).replace("torch.", ""), "attn": "sdpa", "vision_frozen": mode != "full",
            "transformers": transformers.__version__}
    recompute = args.recompute == "full"
    if recompute:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "full":
            vision.clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode in ("full", "full_frozen_vision"):
        lm.requires_grad_(True)
        vision.requires_grad_(mode == "full")
    else:
        import peft
        vision.requires_grad_(False)
        if mode == "qlora":
            import bitsandbytes as bnb
            n = to_bnb_4bit(lm, LM_TARGETS, device) + to_bnb_4bit(vision.clip, CLIP_TARGETS, device)
            info.update(bitsandbytes=bnb.__version__, nf4_layers=n, nf4_targets=LM_TARGETS + CLIP_TARGETS,
                        double_quant=True)
        lm = peft.get_peft_model(lm, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                     target_modules=LM_TARGETS, bias="none",
                                                     task_type="CAUSAL_LM"))
        info.update(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=LM_TARGETS, peft=peft.__version__)
    lm.train()
    vision.train(mode == "full")
    params = [p for p in list(lm.parameters()) + list(vision.parameters()) if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=fused)
    info["optimizer"] = f"torch.optim.AdamW(fused={fused})"
    info["trainable_params"] = sum(p.numel() for p in params)
    embed = lm.get_input_embeddings()

    def step(s: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            ids = s["input_ids"]
            is_img = ids < 0
            grad_ctx = torch.enable_grad() if mode == "full" else torch.no_grad()
            with grad_ctx:
                img = vision(s["pixel_values"].to(wdtype), s["image_sizes"], int(s["image_tokens"]))
            x = embed(ids.clamp(min=0))
            x = x.masked_scatter(is_img[..., None], img.to(x.dtype))
            loss = lm(inputs_embeds=x, labels=s["labels"]).loss          # mean over supervised tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, info, (lm, vision, opt)


# ------------------------------------------------------------------------------------------------
# measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        # decimal GB, PERF.md's unit (the HF baseline was measured so)
        return torch.cuda.max_memory_allocated(device) / 1e9, "torch.cuda.max_memory_allocated / 1e9"
    # CPU: the whole process' peak resident set (model build included); orientation only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "ru_maxrss (CPU process, incl. build)"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step, sample: dict, warmup: int, steps: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step(sample) for _ in range(warmup)]
    times = []
    sync(device)
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step(sample))
        sync(device)
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_start
    mem, mem_src = peak_gb(device)
    losses = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    return {"elapsed_s": elapsed, "step_times_s": times, "peak_mem_gb": mem, "peak_mem_source": mem_src,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_group(impl: str, mode: str, args) -> list[dict]:
    """Build one (impl, mode) and measure every sample; failures become error entries."""
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = Phi3VConfig() if args.config == "real" else Phi3VConfig.tiny()
    if args.config == "real":
        n_params = N_REAL
    else:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in Phi3V(cfg).parameters())
    k = 6 if mode in ("full", "full_frozen_vision") else 4
    base = {"impl": impl, "mode": mode, "config": {"recompute": args.recompute,
                                                   "compile": args.compile and impl == "phi3v"}}
    samples = {name: make_sample(name, cfg) for name in args.samples}
    rows = [dict(base, sample=name, tokens=s["tokens"], images=s["n_images"], real_crops=s["real_crops"],
                 image_tokens=s["image_tokens"], supervised_tokens=int((s["labels"] != -100).sum()),
                 samples_per_s=None, tokens_per_s=None, images_per_s=None, mfu=None, peak_mem_gb=None,
                 mfu_params=n_params, mfu_k=k) for name, s in samples.items()]
    if impl == "hf" and (mode == "qlora" or args.recompute == "selective" or args.offload_activations):
        reason = None
        if args.offload_activations:
            reason = "the HF recipe has no activation offloading"
        elif args.recompute == "selective":
            reason = "the HF stack has no selective recomputation (only none / full gradient checkpointing)"
        elif not bnb_available():
            reason = "bitsandbytes is not importable (see bench/README.md for the wheel)"
        elif device.type != "cuda":
            reason = "bitsandbytes Linear4bit needs a CUDA device"
        if reason:
            for r in rows:
                r["skipped"] = reason
            return rows
    try:
        t0 = time.perf_counter()
        build = build_phi3v if impl == "phi3v" else build_hf
        step, info, keep = build(cfg, mode, args, device, dtype)
        sync(device)
        build_s = time.perf_counter() - t0
        free(device)
    except Exception as e:   # noqa: BLE001 - any build failure (OOM, missing package) is a result
        msg = f"build failed: {type(e).__name__}: {e}"
        print(f"[{impl}/{mode}] {msg}\n{traceback.format_exc(limit=4)}", file=sys.stderr, flush=True)
        for r in rows:
            r["error"] = msg[:2000]
        return rows
    for r in rows:
        r["config"].update(info)
        r["build_s"] = build_s
        if impl == "phi3v":     # what the memory planner predicts for this very step (PERF.md's "planned_peak_gb")
            r["planned_peak_gb"] = memory.estimate(
                "full" if mode.startswith("full") else mode, freeze_vision=mode != "full", recompute=args.recompute,
                dtype=dtype, config=cfg, lora_rank=LORA_RANK, lora_targets=LM_TARGETS,
                batch=samples[r["sample"]], offload_activations=args.offload_activations)["peak_gb"]
        s = to_device(samples[r["sample"]], device)
        print(f"[{impl}/{mode}/{r['sample']}] {r['tokens']} tokens: {args.warmup} warm-up + {args.steps} timed steps",
              file=sys.stderr, flush=True)
        try:
            m = measure(step, s, args.warmup, args.steps, device)
        except Exception as e:  # noqa: BLE001 - OOM and friends: record, free, go on
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"[{impl}/{mode}/{r['sample']}] failed: {r['error'][:300]}", file=sys.stderr, flush=True)
            free(device)
            continue
        sps = args.steps / m["elapsed_s"]
        r.update(m, samples_per_s=sps, tokens_per_s=sps * r["tokens"], images_per_s=sps * r["images"],
                 step_time_median_s=statistics.median(m["step_times_s"]),
                 mfu=k * n_params * r["tokens"] * sps / PEAK_FLOPS, warmup=args.warmup, steps=args.steps)
        del s
        free(device)
    del step, keep
    free(device)
    return rows


# ------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_info() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions() -> dict:
    import importlib.metadata as md
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for pkg in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(runs: list[dict]) -> str:
    head = f"{'impl':6} {'mode':19} {'sample':6} {'tokens':>6} {'samples/s':>9} {'tokens/s':>9} {'images/s':>8} " \
           f"{'MFU':>6} {'peak GB':>7} {'plan GB':>7}  note"
    lines = [head, "-" * len(head)]
    for r in runs:
        note = r.get("skipped") or r.get("error") or ""
        lines.append(f"{r['impl']:6} {r['mode']:19} {r['sample']:6} {r['tokens']:>6} {fmt(r['samples_per_s'], '9.3f')} "
                     f"{fmt(r['tokens_per_s'], '9.0f')} {fmt(r['images_per_s'], '8.2f')} "
                     f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '5.1f')}% {fmt(r['peak_mem_gb'], '7.2f')} "
                     f"{fmt(r.get('planned_peak_gb'), '7.2f')}  "
                     f"{note[:70]}")
    return "\n".join(lines)


def ratios(runs: list[dict]) -> list[dict]:
    """phi3v / hf samples/s for every (mode, sample) both measured in this run."""
    ok = {(r["impl"], r["mode"], r["sample"]): r for r in runs if r.get("samples_per_s")}
    out = []
    for (impl, mode, sample), r in ok.items():
        if impl == "phi3v" and ("hf", mode, sample) in ok:
            hf = ok[("hf", mode, sample)]
            out.append({"mode": mode, "sample": sample, "phi3v_over_hf": r["samples_per_s"] / hf["samples_per_s"],
                        "phi3v_peak_mem_gb": r["peak_mem_gb"], "hf_peak_mem_gb": hf["peak_mem_gb"]})
    return out


def default_out(device: torch.device) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if device.type != "cuda":   # CPU smoke runs never land in bench/results (only GPU runs are committed)
        return Path(tempfile.gettempdir()) / "phi3v-bench" / f"{slug}-{date}.json"
    out = REPO / "bench" / "results" / f"{slug}-{date}.json"
    if out.exists():            # one file per run: never overwrite an earlier run of the same day
        out = out.with_name(f"{slug}-{date}-{datetime.datetime.now(datetime.timezone.utc).strftime('%H%M%S')}.json")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    csv = lambda s: [x for x in s.split(",") if x]   # noqa: E731
    p.add_argument("--impl", choices=["phi3v", "hf", "both"], default="both")
    p.add_argument("--modes", type=csv, default=list(MODES), help="comma list of " + ",".join(MODES))
    p.add_argument("--samples", type=csv, default=list(SAMPLES), help="comma list of " + ",".join(SAMPLES))
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="activation recomputation (phi3v.recompute); hf has none or full (every decoder block, "
                        "and CLIP layer when trained), so its selective rows are skipped")
    p.add_argument("--compile", action="store_true", help="torch.compile every phi3v decoder block (block.compile())")
    p.add_argument("--offload_activations", action="store_true",
                   help="phi3v: saved tensors in host memory until backward (train.py's option of that name)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per (impl, mode, sample)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, Adam state)")
    p.add_argument("--config", choices=["real", "tiny"], default="real", help="real: Phi-3.5-vision sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--nf4-backend", dest="nf4_backend", choices=["auto", "torch", "bnb"], default="auto",
                   help="phi3v QLoRA matmul: auto = bitsandbytes when importable on CUDA, else phi3v's own")
    p.add_argument("--isolate", choices=["process", "none"], default="process",
                   help="process: every (impl, mode) in a fresh subprocess; none: one process, memory freed between")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/<device>-<date>.json on GPU)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", dest="worker_out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    bad = [m for m in a.modes if m not in MODES] + [s for s in a.samples if s not in SAMPLES]
    if bad or not a.modes or not a.samples:
        p.error(f"unknown or empty --modes/--samples entries: {bad}")
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return a


def worker_argv(args, impl: str, mode: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, mode, "--worker-out", str(out),
            "--samples", ",".join(args.samples), "--recompute", args.recompute, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--config", args.config, "--device", args.device, "--dtype", args.dtype,
            "--nf4-backend", args.nf4_backend, "--seed", str(args.seed)]
    return argv + (["--compile"] if args.compile else []) + \
        (["--offload_activations"] if args.offload_activations else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:                              # one (impl, mode) in this process
        rows = run_group(*args.worker, args)
        args.worker_out.write_text(json.dumps(rows))
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    out = args.out or default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"device": device_name(device), **versions(), "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **git_info(),
              "model_config": args.config, "batch": "micro-batch 1, one optimizer step per sample",
              "peak_flops": PEAK_FLOPS, "mfu_params": N_REAL if args.config == "real" else "tiny config's own count",
              "notes": [HF_NOTE,
                        "phi3v full modes: bf16 weights + ZeroAdamW fp32 master/moments; hf full modes: fp32 weights "
                        "under bf16 autocast + fused torch AdamW (PERF.md's baseline). --compile applies to phi3v "
                        "only.",
                        "samples_per_s = timed steps / time between synchronisations; peak_mem_gb since a reset after "
                        "model + optimizer construction."],
              "runs": []}
    if device.type != "cuda" or args.config != "real":
        result["notes"].append("NOT A GPU FIGURE: CPU and/or tiny config smoke run; MFU here is meaningless.")
    impls = IMPLS if args.impl == "both" else (args.impl,)
    for mode in args.modes:
        for impl in impls:
            t0 = time.perf_counter()
            if args.isolate == "none":
                rows = run_group(impl, mode, args)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    wout = Path(tmp) / "rows.json"
                    rc = subprocess.run(worker_argv(args, impl, mode, wout)).returncode
                    if wout.exists():
                        rows = json.loads(wout.read_text())
                    else:                        # the worker died (killed for memory, segfault, ...)
                        rows = [{"impl": impl, "mode": mode, "sample": s, "config": {"recompute": args.recompute},
                                 "tokens": make_sample(s, Phi3VConfig.tiny())["tokens"], "samples_per_s": None,
                                 "tokens_per_s": None, "images_per_s": None, "mfu": None, "peak_mem_gb": None,
                                 "error": f"worker process exited with code {rc} without results"}
                                for s in args.samples]
            for r in rows:
                r["group_wall_s"] = time.perf_counter() - t0
            result["runs"] += rows
            result["ratios"] = ratios(result["runs"])
            out.write_text(json.dumps(result, indent=1) + "\n")    # after every group: partial results survive
            print(table(rows), flush=True)
    print("\n" + table(result["runs"]))
    for q in result["ratios"]:
        print(f"phi3v/hf {q['mode']} {q['sample']}: {q['phi3v_over_hf']:.2f}x samples/s")
    print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
