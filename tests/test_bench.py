"""CPU smoke test of bench/train_step.py: both implementations run a real step on the tiny config and
the results file has PERF.md's schema. The figures are CPU/tiny ones: only their sign is checked."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "cpu-smoke.json"
    cmd = [sys.executable, str(SCRIPT), "--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
           "--impl", "both", "--samples", "docvqa", "--modes", "lora,full", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_results_schema(smoke):
    res, _ = smoke
    for key in ("device", "torch", "command", "runs", "date", "git_commit"):
        assert key in res, key
    assert isinstance(res["device"], str) and res["device"]
    assert "bench/train_step.py" in res["command"] and "--config tiny" in res["command"]
    assert any("NOT A GPU FIGURE" in n for n in res["notes"])       # a CPU run says so
    got = {(r["impl"], r["mode"], r["sample"]) for r in res["runs"]}
    assert got == {(i, m, "docvqa") for i in ("phi3v", "hf") for m in ("lora", "full")}
    for r in res["runs"]:
        for key in ("impl", "mode", "sample", "config", "tokens", "samples_per_s", "mfu", "peak_mem_gb"):
            assert key in r, (key, r)
        assert isinstance(r["config"], dict) and r["config"]["recompute"] in ("none", "full")
        assert r["tokens"] == 2443                                    # 2353 image tokens + 90 text


def test_figures_positive(smoke):
    res, stdout = smoke
    for r in res["runs"]:
        where = f"{r['impl']}/{r['mode']}"
        assert "error" not in r and "skipped" not in r, (where, r.get("error") or r.get("skipped"))
        for key in ("samples_per_s", "tokens_per_s", "images_per_s", "mfu", "peak_mem_gb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (where, key, r[key])
        assert 0 < r["mfu"] < 1                                       # a fraction, not a percentage
        assert math.isclose(r["tokens_per_s"], r["samples_per_s"] * r["tokens"], rel_tol=1e-9)
        assert math.isfinite(r["loss_first"]) and r["loss_first"] > 0
        assert r["config"]["trainable_params"] > 0
    lora = {r["impl"]: r for r in res["runs"] if r["mode"] == "lora"}
    assert lora["phi3v"]["config"]["lora_rank"] == 64 and lora["phi3v"]["config"]["vision_frozen"]
    assert lora["phi3v"]["config"]["trainable_params"] == lora["hf"]["config"]["trainable_params"]
    assert {q["mode"] for q in res["ratios"]} == {"lora", "full"}
    assert "phi3v/hf lora docvqa" in stdout                           # the printed table and ratios


def test_sample_shapes():
    """The synthetic samples have PERF.md's token counts and crop layout on both configs."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_step
    finally:
        sys.path.remove(str(REPO / "bench"))
    from phi3v import Phi3VConfig
    for cfg in (Phi3VConfig(), Phi3VConfig.tiny()):
        d = train_step.make_sample("docvqa", cfg)
        assert d["tokens"] == 2443 and d["image_tokens"] == 2353 and d["real_crops"] == 16
        assert list(d["pixel_values"].shape) == [1, 17, 3, 336, 336] and d["image_sizes"].tolist() == [[1008, 1680]]
        u = train_step.make_sample("ucf", cfg)
        assert u["tokens"] == 6116 and u["image_tokens"] == 8 * 757 and u["n_images"] == 8
        assert list(u["pixel_values"].shape) == [8, 5, 3, 336, 336]
        for s in (d, u):
            assert int((s["input_ids"] < 0).sum()) == s["image_tokens"]
            sup = s["labels"] != -100
            assert 0 < int(sup.sum()) <= 8 and bool((s["input_ids"][sup] >= 0).all())


def test_lora_trainable_count_matches_real_model():
    """On the real shapes, our LoRA and peft's train the same number of parameters (meta device)."""
    import torch

    from phi3v import Phi3V, Phi3VConfig, apply_lora
    with torch.device("meta"):
        m = Phi3V(Phi3VConfig())
    apply_lora(m, rank=64, alpha=128)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # per layer: r * (in + out) for qkv (3072->9216), o (3072->3072), gate_up (3072->16384), down (8192->3072)
    assert n == 32 * 64 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))


# ------------------------------------------------------------------------------------------------
# bench/optim_step.py

def optim_bench(*args: str) -> tuple[float, str]:
    cmd = [sys.executable, str(REPO / "bench" / "optim_step.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ratio = [line for line in proc.stdout.splitlines() if line.startswith("ratio")]
    assert len(ratio) == 1, proc.stdout
    return float(ratio[0].split()[-1]), proc.stdout


def test_optim_step_bench_smoke():
    """Runs and prints both timings; --check holds (equal to AdamW(foreach=False) within 1e-6)."""
    ratio, out = optim_bench("--params", "2e5", "--steps", "2", "--warmup", "1", "--check")
    assert ratio > 0 and "ZeroAdamW.step" in out and "AdamW(fused=True)" in out
    assert "check: ZeroAdamW == " in out


@pytest.mark.slow
def test_optim_step_within_1p3x_of_torch_fused():
    """Issue 14's criterion on CPU: 50M fp32 parameters, ZeroAdamW.step (clipping included) at most 1.3x
    clip_grad_norm_(foreach=True) + AdamW(fused=True), median of 10 steps after warm-up. Slow-marked:
    a timing on a shared machine."""
    ratio, out = optim_bench("--params", "50e6", "--steps", "10", "--warmup", "3")
    assert ratio <= 1.3, out


def test_generate_bench_smoke(tmp_path):
    """bench/generate.py on 2 generated clips: one preprocessing line, then one line per
    (batch size, workers) with a positive samples/s."""
    cmd = [sys.executable, str(REPO / "bench" / "generate.py"), "--n_test", "2", "--batch_sizes", "1,2",
           "--workers", "0,1", "--max_new_tokens", "1", "--repeats", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["preprocess_ms_per_sample"] > 0 and lines[0]["samples"] == 2
    assert [(r["batch_size"], r["num_workers"]) for r in lines[1:]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["samples_per_s"] > 0 for r in lines[1:])
