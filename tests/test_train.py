"""train.py end to end, as the real CLI (subprocesses, torchrun with gloo for 2 ranks): outputs,
exact resume (also after SIGKILL, also mid-checkpoint), a diverging run, a second run on an output_dir
in use, 1 vs 2 ranks, every mode and preset, bad input, the recipe's flag aliases. Tiny model, 8
training clips, 2..4 optimizer steps (6 in the one slow test); the default run takes about 2 minutes
on 2 idle cores."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import (ENV, REPO, command, copy_truncated, differing, final_state, kill_when, max_diff,
                           metrics, start, train)

sys.path.insert(0, str(REPO))
import train as train_py  # noqa: E402
from phi3v import Phi3V, Processor, load_adapter  # noqa: E402
from phi3v.checkpoint import latest_checkpoint  # noqa: E402

N = 4  # optimizer steps of the reference runs (8 samples, batch 4: 2 epochs), checkpoints at 2 and 4


def common(demo_dir, out, steps=N) -> list:
    return ["--task", "demo", "--model", demo_dir / "model", "--data_dir", demo_dir / "data", "--output_dir", out,
            "--no_tqdm", "--batch_size", 4, "--micro_batch_size", 2, "--max_eval_samples", 2,
            "--max_new_tokens", 4, "--num_workers", 0, "--logging_steps", 1, "--max_steps", steps]


def resumable(demo_dir, out) -> list:
    return common(demo_dir, out) + ["--save_steps", 2, "--keep_checkpoints", 5]


@pytest.fixture(scope="module")
def ref(demo_dir, tmp_path_factory):
    """The uninterrupted 1-rank LoRA run (N steps, checkpoints every 2, merged export)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = train(resumable(demo_dir, out) + ["--merge"])
    return out, r


@pytest.fixture(scope="module")
def ref2(demo_dir, tmp_path_factory):
    """The same run on 2 ranks (torchrun, gloo); its evaluations take 3 records one per batch, so
    rank 0 answers records 0 and 2, rank 1 record 1."""
    out = tmp_path_factory.mktemp("ref2") / "out"
    train(resumable(demo_dir, out) + ["--max_eval_samples", 3, "--eval_batch_size", 1], nproc=2)
    return out


def assert_step_records(out, steps):
    recs = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in recs] == list(range(1, steps + 1)), "one record per logged step, each once"
    for m in recs:
        assert 0 < m["loss"] < 100 and m["lr"] >= 0
        if m.get("fp16_overflow_skipped"):
            assert m["grad_norm"] is None
        else:
            assert m["grad_norm"] >= 0
    return recs


# ---------------------------------------------------------------- outputs

def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def val_ids(demo_dir, n: int) -> list[str]:
    return [json.loads(line)["id"] for line in (demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()[:n]]


def test_every_promised_output(ref, demo_dir):
    out, r = ref
    recs = assert_step_records(out, N)
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] > 0                     # warmup starts at 0
    evals = [m for m in metrics(out) if "loss" not in m]
    assert [e["eval"] for e in evals] == ["before", "after"] and all(0 <= e["accuracy"] <= 1 for e in evals)
    assert evals[0]["step"] == 0 and evals[1]["step"] == recs[-1]["step"]
    for s in (2, 4):
        ck = out / "checkpoints" / f"step-{s}"
        listed = json.loads((ck / "COMPLETE").read_text())["files"]
        assert {"weights.safetensors", "optim_rank0.pt", "meta.json"} <= set(listed)
        assert all((ck / f).stat().st_size == size for f, size in listed.items())
        assert json.loads((ck / "meta.json").read_text())["step"] == s
    assert latest_checkpoint(out).name == f"step-{N}"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert any("vision_embed_tokens" in k for k in adapter), "vision LoRA is on unless --freeze_vision"
    ev = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert 0.0 <= ev[when]["accuracy"] <= 1.0 and ev[when]["n"] == 2
        # every evaluated record's answer, in input order; eval.json's examples are the first of them
        preds = predictions(out / "predictions" / f"{when}.jsonl")
        assert [p["id"] for p in preds] == val_ids(demo_dir, 2)
        assert all(set(p) == {"id", "prediction", "answers", "correct"} for p in preds)
        assert preds == ev[when]["examples"]
        assert ev[when]["accuracy"] == sum(p["correct"] for p in preds) / 2
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert "Traceback" not in r.stderr


def test_adapter_equals_checkpoint_weights(ref, demo_dir):
    """The exported peft adapter is the trained state: loading it reproduces the step-N weights."""
    out, _ = ref
    m = Phi3V.from_pretrained(demo_dir / "model")
    load_adapter(m, out)
    w = load_file(out / "checkpoints" / f"step-{N}" / "weights.safetensors")
    params = dict(m.named_parameters())
    assert w and all(torch.equal(params[k], v) for k, v in w.items())


# ---------------------------------------------------------------- resume

def test_no_checkpoint_then_sigkill_after_checkpoint_resumes_bitwise_with_dropout(demo_dir, tmp_path):
    """LoRA dropout 0.1, so the RNG state must continue exactly too."""
    def args(out):
        return resumable(demo_dir, out) + ["--lora_dropout", 0.1]
    straight = tmp_path / "straight"
    train(args(straight))
    out, log = tmp_path / "run", tmp_path / "log1"
    p = start(args(out) + ["--resume"], log)        # nothing to resume yet
    kill_when(p, lambda: (out / "checkpoints" / "step-2" / "COMPLETE").exists(), log)
    assert "no complete checkpoint" in log.read_text() and "starting from scratch" in log.read_text()
    ck = latest_checkpoint(out)
    assert ck is not None and ck.name == "step-2", "killed too late (test timing)"
    owner = json.loads((out / ".lock").read_text())       # the killed run's lock file is left behind
    assert owner["pid"] == p.pid
    r = train(args(out) + ["--resume"])
    assert f"resumed from {ck}" in r.stdout
    assert (f"{out}: took over the lock of run pid {p.pid} on host {owner['host']} started {owner['started']} "
            "(no longer running)") in r.stdout
    assert not (out / ".lock").exists(), "released at the end"
    bad = differing(final_state(out, N), final_state(straight, N))
    assert not bad, f"resumed run differs from the uninterrupted one in {bad[:5]}"
    assert_step_records(out, N)
    assert json.loads((out / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_sigkill_while_writing_checkpoint_resumes_bitwise(demo_dir, ref, tmp_path):
    for attempt in range(3):
        out, log = tmp_path / f"run{attempt}", tmp_path / f"log{attempt}"
        tmp4 = out / "checkpoints" / ".tmp-step-4"
        p = start(resumable(demo_dir, out), log)
        kill_when(p, lambda: (tmp4 / "optim_rank0.pt").exists(), log)
        if tmp4.exists() and not (out / "checkpoints" / "step-4").exists():
            break       # killed mid-save
    else:
        pytest.fail("could not land a SIGKILL while step-4 was being written in 3 tries")
    assert latest_checkpoint(out).name == "step-2", "the previous checkpoint must stay usable"
    r = train(resumable(demo_dir, out) + ["--resume"])
    assert "resumed from" in r.stdout and "step-2" in r.stdout
    assert not tmp4.exists()
    bad = differing(final_state(out, N), final_state(ref[0], N))
    assert not bad, f"resumed run differs from the uninterrupted one in {bad[:5]}"
    assert_step_records(out, N)      # steps 3-4 logged before the kill appear once, not twice


def test_sigkill_between_last_checkpoint_and_export_then_resume_completes(demo_dir, ref, tmp_path):
    """Killed after the final checkpoint, before the evaluation and export: --resume must not call
    the run finished but write every missing output (eval after, adapter, processor files, loss.png,
    merged model), equal to the uninterrupted run's."""
    args = lambda out: resumable(demo_dir, out) + ["--merge"]      # noqa: E731  (as the ref run)
    for attempt in range(3):
        out, log = tmp_path / f"run{attempt}", tmp_path / f"log{attempt}"
        p = start(args(out), log)
        kill_when(p, lambda: (out / "checkpoints" / f"step-{N}" / "COMPLETE").exists(), log)
        if not (out / "adapter_model.safetensors").exists():
            break
    else:
        pytest.fail("could not land a SIGKILL between the last checkpoint and the export in 3 tries")
    assert json.loads((out / "eval.json").read_text())["after"] is None
    r = train(args(out) + ["--resume"])
    assert f"resumed from {out / 'checkpoints' / f'step-{N}'}" in r.stdout
    assert "writing the missing outputs: eval after, adapter, processor files, loss.png, merged model" in r.stdout
    assert "nothing to do" not in r.stdout
    bad = differing(final_state(out, N), final_state(ref[0], N))
    assert not bad, f"completed run differs from the uninterrupted one in {bad[:5]}"
    assert json.loads((out / "eval.json").read_text()) == json.loads((ref[0] / "eval.json").read_text())
    assert (out / "predictions" / "after.jsonl").read_bytes() == (ref[0] / "predictions" / "after.jsonl").read_bytes()
    assert [m.get("eval") for m in metrics(out) if "loss" not in m] == ["before", "after"]
    assert_step_records(out, N)
    for name in ("loss.png", "tokenizer.json", "preprocessor_config.json", "merged/config.json"):
        assert (out / name).is_file(), name
    assert (out / "merged" / "model.safetensors").read_bytes() == (ref[0] / "merged" / "model.safetensors").read_bytes()
    again = train(args(out) + ["--resume"])
    assert "already finished" in again.stdout and "nothing to do" in again.stdout


def test_damaged_newest_checkpoint_falls_back_or_refuses(demo_dir, ref, tmp_path):
    """A file of the newest checkpoint damaged in place (same size): `--resume` says so and resumes
    from the checkpoint before it (ending bitwise like the uninterrupted run); `--resume DIR` on the
    damaged one refuses in one line."""
    out = tmp_path / "damaged"
    shutil.copytree(ref[0], out)
    ck = out / "checkpoints" / f"step-{N}"
    r = train(resumable(demo_dir, out) + ["--resume", "--lora_rank", 8], check=False)     # other settings
    assert r.returncode == 1 and r.stderr.strip() == (f"train.py: error: --resume {ck}: the checkpoint was trained "
                                                      "with lora_rank=16, this run has lora_rank=8; resume with the "
                                                      "same settings"), r.stderr
    f = ck / "optim_rank0.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = train(resumable(demo_dir, out) + ["--resume", ck], check=False)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"train.py: error: --resume {ck}: {f} is damaged"), lines[0]
    r = train(resumable(demo_dir, out) + ["--resume"])
    assert f"cannot use {ck}: {f} is damaged" in r.stdout and "falling back" in r.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in r.stdout
    bad = differing(final_state(out, N), final_state(ref[0], N))
    assert not bad, f"resumed run differs from the uninterrupted one in {bad[:5]}"


def test_resume_finished_run_does_nothing(demo_dir, ref, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(ref[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = train(resumable(demo_dir, out) + ["--resume"])
    assert "already finished" in r.stdout
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_two_rank_evaluation_predictions_in_input_order(ref2, demo_dir):
    for when in ("before", "after"):
        preds = predictions(ref2 / "predictions" / f"{when}.jsonl")
        assert [p["id"] for p in preds] == val_ids(demo_dir, 3), when
        assert preds[:5] == json.loads((ref2 / "eval.json").read_text())[when]["examples"]


# ---------------------------------------------------------------- divergence, a second run on the output_dir

def stderr_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


def test_nonfinite_loss_stops_the_run_at_that_step(demo_dir, tmp_path):
    """bf16 with lr 1e30: step 2's update blows the LoRA weights up (finite, ~1e29) and step 3's loss is
    nan. The run stops there in one line naming the step, the value, what to try and the checkpoint to
    resume from; step 3 is neither applied nor logged, metrics.jsonl stays strict JSON, nothing is
    evaluated or exported."""
    out = tmp_path / "nan"
    r = train(common(demo_dir, out) + ["--save_steps", 2, "--bf16", "--learning_rate", 1e30], check=False)
    ck = out / "checkpoints" / "step-2"
    assert r.returncode == 1 and "Traceback" not in r.stderr and stderr_lines(r) == [
        "train.py: error: step 3: the training loss is nan (the step was not applied). Training stopped; try a "
        "lower --learning_rate (this run: 1e+30), a smaller --max_grad_norm (this run: 1) or --fp32, then resume "
        f"from the newest checkpoint, {ck} (--resume), or an earlier one (--resume DIR)"], r.stderr
    recs = metrics(out)                                 # strict: NaN or Infinity would raise
    assert [m["step"] for m in recs if "loss" in m] == [1, 2]
    assert [m["eval"] for m in recs if "eval" in m] == ["before"]
    assert latest_checkpoint(out) == ck
    assert all(torch.isfinite(v).all() for v in load_file(ck / "weights.safetensors").values())
    assert json.loads((out / "eval.json").read_text())["after"] is None
    assert not (out / "adapter_model.safetensors").exists() and not (out / ".lock").exists()


def test_nonfinite_weights_are_not_checkpointed_and_resume_finishes(demo_dir, ref, tmp_path):
    """lr 1e39: step 2's update (lr 2.5e38, warming up) overflows the weights to inf/nan although its loss
    and gradient norm were finite. Its checkpoint is not written; the run stops naming step 2 and the
    newest checkpoint, step-1. Resumed from it with the demo's learning rate the run ends bitwise as
    the ref run: step 1 trains with lr 0 (warmup), so step-1 is the same for any --learning_rate."""
    out = tmp_path / "inf"
    r = train(resumable(demo_dir, out) + ["--save_steps", 1, "--learning_rate", 1e39], check=False)
    ck = out / "checkpoints" / "step-1"
    assert r.returncode == 1 and "Traceback" not in r.stderr and stderr_lines(r) == [
        "train.py: error: step 2: the weights or optimizer state after it are not finite (inf or nan), so its "
        "checkpoint was not written. Training stopped; try a lower --learning_rate (this run: 1e+39) or a "
        f"smaller --max_grad_norm (this run: 1), then resume from the newest checkpoint, {ck} (--resume), or an "
        "earlier one (--resume DIR)"], r.stderr
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-1"]
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]
    r = train(resumable(demo_dir, out) + ["--resume"])          # the demo's learning rate again
    assert f"resumed from {ck} at step 1/{N}" in r.stdout
    bad = differing(final_state(out, N), final_state(ref[0], N))
    assert not bad, f"resumed run differs from the uninterrupted one in {bad[:5]}"
    assert_step_records(out, N)


def skip_without_fp16():
    try:
        torch.ones(4, 4, dtype=torch.float16) @ torch.ones(4, 4, dtype=torch.float16)
    except RuntimeError as e:
        pytest.skip(f"fp16 matmul unsupported on this CPU build: {e}")


# train.py with a patch applied first: a gradient norm that is always inf (as after an overflow), or
# fp16 loss scaling whose floor is its start, 2^16 (the demo overflows at its first step with 2^16)
PATCHED = {
    "fp32": ("o.ZeroAdamW._grad_norm = lambda self: float('inf')", [],
             "step 1: the gradient norm is inf (the step was not applied). Training stopped; try a lower "
             "--learning_rate (this run: 0.005) or a smaller --max_grad_norm (this run: 1), then start again "
             "(no checkpoint was written before it)"),
    "fp16": ("o.DynamicLossScaler.__init__.__defaults__ = (2.0 ** 16, 1000, 2.0 ** 16, True)", ["--fp16"],
             " with the fp16 loss scale at its floor, 65536 (the step was not applied). Training stopped; try a "
             "lower --learning_rate (this run: 0.005), a smaller --max_grad_norm (this run: 1) or --bf16 (or "
             "--fp32), then start again (no checkpoint was written before it)"),
}


@pytest.mark.parametrize("case", PATCHED)
def test_nonfinite_gradient_norm_stops(case, demo_dir, tmp_path):
    """A step whose gradient norm is not finite is skipped by the optimizer; in bf16/fp32 the run then
    stops. In fp16 such a step is an overflow: skipped, the loss scale halved, training goes on
    (test_fp16_on_cpu); only with the scale already at its floor does the run stop the same way."""
    if case == "fp16":
        skip_without_fp16()
    patch, flags, message = PATCHED[case]
    out = tmp_path / case
    code = (f"import runpy, sys; import phi3v.optim as o; {patch}; "
            "sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path('train.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, *map(str, common(demo_dir, out, steps=2) + flags)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    lines = stderr_lines(r)
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    if case == "fp32":
        assert lines[0] == "train.py: error: " + message
    else:       # the norm is inf or nan
        assert lines[0].startswith("train.py: error: step 1: the gradient norm is ") and lines[0].endswith(message), \
            lines[0]
    assert not [m for m in metrics(out) if "loss" in m] and not (out / "checkpoints").exists()


def test_second_run_on_the_same_output_dir_is_refused(demo_dir, ref, tmp_path):
    """A second train.py on the output_dir of a running one stops at once, in one line naming the
    directory and the other run, and touches nothing; the first ends bitwise as a lone run (ref). The
    first is held stopped (SIGSTOP) while the second runs, so nothing depends on timing."""
    out, log = tmp_path / "out", tmp_path / "first.log"
    args = resumable(demo_dir, out) + ["--merge"]        # the ref run's arguments
    p = start(args, log)
    try:
        while True:           # until the first run holds the lock (its lock file names it)
            try:
                owner = json.loads((out / ".lock").read_text())
                if owner["pid"] == p.pid:
                    break
            except (OSError, ValueError):
                pass
            assert p.poll() is None, log.read_text()[-4000:]
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGSTOP)
        files = {f: f.read_bytes() if f.is_file() else None for f in out.rglob("*")}
        r = train(args, check=False)
        assert r.returncode == 1 and stderr_lines(r) == [
            f"train.py: error: --output_dir {out} is in use by another run (pid {p.pid} on host {owner['host']}, "
            f"started {owner['started']}); wait for that run to end or choose another --output_dir"], r.stderr
        assert {f: f.read_bytes() if f.is_file() else None for f in out.rglob("*")} == files, "second run wrote"
        os.killpg(p.pid, signal.SIGCONT)
        assert p.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    bad = differing(final_state(out, N), final_state(ref[0], N))
    assert not bad, f"the first run differs from a lone one in {bad[:5]}"
    assert_step_records(out, N)
    assert [m["eval"] for m in metrics(out) if "eval" in m] == ["before", "after"]
    assert not (out / ".lock").exists()


def test_truncate_metrics_writes_strict_json(tmp_path):
    """A resumed run rewrites metrics.jsonl up to its step: a NaN an older version wrote becomes null,
    other records stay byte for byte, a line cut by a kill and later steps go."""
    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"step": 2, "loss": 0.1 + 0.2, "lr": 1e-4, "grad_norm": None, "eval": "é"})
    path.write_text('{"step": 1, "loss": NaN, "grad_norm": Infinity}\n' + good + '\n{"step": 3}\n{"step": 4, "lo')
    train_py.truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": null, "grad_norm": null}\n' + good + "\n"


def test_two_ranks_match_one_rank(ref, ref2):
    """CONTRACT: a 2-rank demo run gives the adapter of the 1-rank run within 1e-4 (dropout 0).
    (Here each run uses train.py's default threads: 2 for one process, 1 per rank for two.)"""
    one = load_file(ref[0] / "adapter_model.safetensors")
    two = load_file(ref2 / "adapter_model.safetensors")
    assert max_diff(one, two) < 1e-4
    assert sorted(p.name for p in (ref2 / "checkpoints" / f"step-{N}").glob("optim_rank*.pt")) == \
        ["optim_rank0.pt", "optim_rank1.pt"]
    assert_step_records(ref2, N)
    assert [m["loss"] for m in metrics(ref2) if "loss" in m] == \
        pytest.approx([m["loss"] for m in metrics(ref[0]) if "loss" in m], rel=1e-5)


# train.py gives each process cores // LOCAL_WORLD_SIZE threads, and CPU matmuls round differently
# with a different thread count. With the thread count of a 2-rank run (LOCAL_WORLD_SIZE=2) a
# single process must give bitwise the 2-rank result: the micro-batches, the token-count
# normalisation and the sharded optimizer are all independent of the world size.
ONE_THREAD = {"LOCAL_WORLD_SIZE": "2"}


@pytest.fixture(scope="module")
def ref1t(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref1t") / "out"
    train(resumable(demo_dir, out), env=ONE_THREAD)
    return out


def assert_bitwise(a_out: Path, b_out: Path):
    a, b = final_state(a_out, N), final_state(b_out, N)
    bad = differing(a, b)
    assert not bad, f"{len(bad)} of {len(a)} tensors differ (max {max_diff(a, b):.3g}), e.g. {bad[:3]}"


def test_two_ranks_bitwise_equal_one_rank_at_equal_threads(ref1t, ref2):
    assert_bitwise(ref1t, ref2)


def test_resume_two_ranks_to_one(demo_dir, ref2, tmp_path):
    out = copy_truncated(ref2, tmp_path / "r21", keep_step=2)
    r = train(resumable(demo_dir, out) + ["--resume"], env=ONE_THREAD)
    assert "resumed from" in r.stdout and "world size 1" in r.stdout
    assert len(list((out / "checkpoints" / f"step-{N}").glob("optim_rank*.pt"))) == 1
    assert_bitwise(out, ref2)       # steps 1-2 on 2 ranks, 3-4 on 1 rank (re-partitioned optimizer)


def test_resume_one_rank_to_two(demo_dir, ref1t, tmp_path):
    out = copy_truncated(ref1t, tmp_path / "r12", keep_step=4)
    ck = out / "checkpoints" / "step-2"
    r = train(resumable(demo_dir, out) + ["--resume", ck], nproc=2)      # an explicit checkpoint dir
    assert f"resumed from {ck}" in r.stdout and "world size 2" in r.stdout
    assert len(list((out / "checkpoints" / f"step-{N}").glob("optim_rank*.pt"))) == 2
    assert_bitwise(out, ref1t)      # steps 1-2 on 1 rank, 3-4 on 2 ranks


@pytest.mark.slow
def test_full_demo_one_and_two_ranks(tmp_path):
    """The demo exactly as a newcomer runs it (defaults, built-in model and data): accuracy > 0.5,
    and a 2-rank run gives the same adapter within 1e-4 (CONTRACT)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--task", "demo", "--output_dir", one, "--no_tqdm"])
    ev = json.loads((one / "eval.json").read_text())
    assert ev["after"]["accuracy"] > 0.5, ev["after"]
    for name in ("metrics.jsonl", "adapter_config.json", "adapter_model.safetensors", "loss.png"):
        assert (one / name).exists(), name
    assert latest_checkpoint(one) is not None
    train(["--task", "demo", "--output_dir", two, "--no_tqdm"], nproc=2)
    assert max_diff(load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")) < 1e-4


# ---------------------------------------------------------------- modes

def test_merge_equals_base_plus_adapter(ref, demo_dir):
    out, _ = ref
    merged = Phi3V.from_pretrained(out / "merged").eval()
    lora = Phi3V.from_pretrained(demo_dir / "model")
    load_adapter(lora, out)
    lora.eval()
    proc = Processor.from_pretrained(out / "merged")
    rec = json.loads((demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()[0])
    turn = rec["conversations"][0]
    images = [Image.open(demo_dir / "data" / "images" / p).convert("RGB") for p in turn["images"]]
    tags = "".join(f"<|image_{k}|>" for k in range(1, len(images) + 1))
    prompt = proc.apply_chat_template([{"role": "user", "content": f"{tags}\n{turn['user']}"}])
    enc = proc(prompt, images)
    with torch.no_grad():
        a = merged(enc["input_ids"], pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).logits
        b = lora(enc["input_ids"], pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).logits
        c = Phi3V.from_pretrained(demo_dir / "model").eval()(
            enc["input_ids"], pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"]).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - c).abs().max().item() > 1e-3, "the merged model must differ from the demo_dir"
    assert not any("lora" in k for k in load_file(out / "merged" / "model.safetensors"))


def test_full_with_frozen_vision(demo_dir, tmp_path):
    out = tmp_path / "full"
    train(common(demo_dir, out, steps=2) + ["--full", "--freeze_vision", "--num_workers", 1])   # a loader worker
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "adapter_model.safetensors").exists()
    trained = dict(Phi3V.from_pretrained(out).named_parameters())
    orig = dict(Phi3V.from_pretrained(demo_dir / "model").named_parameters())
    vision = [k for k in orig if k.startswith("vision.")]
    assert vision and all(torch.equal(trained[k], orig[k]) for k in vision), "vision changed"
    changed = [k for k in orig if not k.startswith("vision.") and not torch.equal(trained[k], orig[k])]
    assert "lm_head.weight" in changed and any(k.startswith("layers.") for k in changed)
    assert json.loads((out / "eval.json").read_text())["after"]["accuracy"] is not None


def test_lora_frozen_vision_and_packing(demo_dir, ref, tmp_path):
    """--packing: same step-1 loss as the padded reference (nothing trained yet, lr 0 at step 1;
    the frozen vision only changes what is trained); --freeze_vision: no vision LoRA at all."""
    out = tmp_path / "packed"
    train(common(demo_dir, out, steps=2) + ["--packing", "--freeze_vision"])
    packed = assert_step_records(out, 2)
    padded = [m for m in metrics(ref[0]) if "loss" in m]
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5)
    assert packed[1]["loss"] == pytest.approx(padded[1]["loss"], rel=1e-5)  # lr(0) = 0: same weights
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and not any("vision_embed_tokens" in k for k in keys)


def test_offload_activations_changes_no_bit(demo_dir, ref, tmp_path):
    """--offload_activations: saved tensors of 1 MiB and more (here the CLIP layers' inputs) wait in
    host memory; the run ends bitwise where the reference ends (weights, optimizer, adapter)."""
    out = tmp_path / "offload"
    r = train(resumable(demo_dir, out) + ["--offload_activations"])
    assert "saved activations in host memory" in r.stdout
    assert differing(final_state(out, N), final_state(ref[0], N)) == []


def test_qlora_on_cpu(demo_dir, tmp_path):
    """Our NF4 demo_dir (activation checkpointing on, the default) + LoRA."""
    out = tmp_path / "qlora"
    r = train(common(demo_dir, out, steps=2) + ["--qlora"])
    assert "mode qlora" in r.stdout
    assert_step_records(out, 2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    m = Phi3V.from_pretrained(demo_dir / "model")
    load_adapter(m, out)                       # the adapter fits the unquantised demo_dir
    assert json.loads((out / "eval.json").read_text())["after"] is not None


def test_eval_only_with_adapter(demo_dir, ref, tmp_path):
    out = tmp_path / "eval"
    args = ["--task", "demo", "--model", demo_dir / "model", "--data_dir", demo_dir / "data", "--output_dir", out,
            "--no_tqdm", "--max_eval_samples", 2, "--max_new_tokens", 4, "--eval_only", "--adapter", ref[0]]
    train(args)
    ev = json.loads((out / "eval.json").read_text())
    ref_after = json.loads((ref[0] / "eval.json").read_text())["after"]
    for when in ("before", "after"):       # the contract's shape, also for --eval_only
        assert ev[when]["examples"] == ref_after["examples"] and ev[when]["accuracy"] == ref_after["accuracy"]
    assert not (out / "checkpoints").exists() and not (out / "adapter_model.safetensors").exists()
    # the predictions of --eval_only, and they are the ones of the evaluation after training
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["eval_only.jsonl"]
    assert (out / "predictions" / "eval_only.jsonl").read_bytes() == \
        (ref[0] / "predictions" / "after.jsonl").read_bytes()


def test_generate_data_gives_the_evaluation_predictions(demo_dir, ref, tmp_path):
    """`python -m phi3v.generate --data` on the eval records with the run's eval batch size and
    max_new_tokens writes the predictions file of the evaluation after training, byte for byte,
    and its accuracy."""
    (tmp_path / "images").symlink_to(demo_dir / "data" / "images")
    data = tmp_path / "val.jsonl"
    val = (demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()
    data.write_text(val[0] + "\n" + val[1] + "\n")
    r = subprocess.run([sys.executable, "-m", "phi3v.generate", "--model", str(demo_dir / "model"), "--adapter",
                        str(ref[0]), "--data", str(data), "--out", str(tmp_path / "p.jsonl"), "--batch_size", "4",
                        "--max_new_tokens", "4", "--no_tqdm"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.jsonl").read_bytes() == (ref[0] / "predictions" / "after.jsonl").read_bytes()
    after = json.loads((ref[0] / "eval.json").read_text())["after"]
    assert json.loads((tmp_path / "p.metrics.json").read_text()) == {"accuracy": after["accuracy"], "n": 2}


def test_bf16_on_cpu_with_progress_bar(demo_dir, tmp_path):
    out = tmp_path / "bf16"
    r = train([a for a in common(demo_dir, out, steps=2) if a != "--no_tqdm"] + ["--bf16"])
    assert "bfloat16" in r.stdout and "train:" in r.stderr      # tqdm's bar on stderr
    assert_step_records(out, 2)
    assert (out / "adapter_model.safetensors").exists()


def test_fp16_on_cpu(demo_dir, tmp_path):
    skip_without_fp16()
    out = tmp_path / "fp16"
    train(common(demo_dir, out, steps=2) + ["--fp16"])
    recs = assert_step_records(out, 2)      # strict JSON: an overflowed step has grad_norm null
    assert recs[0].get("fp16_overflow_skipped"), "loss scale 2^16 overflows at first (dynamic scaling)"
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_fp16_on_cpu_trains_after_overflows(demo_dir, tmp_path):
    out = tmp_path / "fp16"
    train(common(demo_dir, out, steps=6) + ["--fp16"])
    recs = assert_step_records(out, 6)
    applied = [m for m in recs if not m.get("fp16_overflow_skipped")]
    assert applied and applied[-1]["loss"] < recs[0]["loss"]


# ---------------------------------------------------------------- presets

@pytest.fixture(scope="module")
def preset_data(tmp_path_factory):
    """Every preset's converted layout, built with the converters from tiny raw inputs."""
    pytest.importorskip("av")
    import helpers as h
    from convert import docvqa, hateful_memes, nlvr2, ucf101
    root = tmp_path_factory.mktemp("presets")
    for name, raw, conv in (("ucf101", h.ucf101_raw, ucf101.convert), ("docvqa", h.docvqa_raw, docvqa.convert),
                            ("hateful_memes", h.hateful_memes_raw, hateful_memes.convert),
                            ("nlvr2", h.nlvr2_raw, nlvr2.convert)):
        conv(raw(root / "raw" / name), root / name)
    return root


@pytest.mark.parametrize("task", ["ucf101", "docvqa", "hateful_memes", "nlvr2", "jsonl"])
def test_preset_runs(task, demo_dir, preset_data, tmp_path):
    out = tmp_path / task
    if task == "jsonl":
        data = ["--train_file", preset_data / "nlvr2" / "nlvr2_train.jsonl",
                "--eval_file", preset_data / "nlvr2" / "nlvr2_val.jsonl"]
    else:
        data = ["--data_dir", preset_data / task]
    r = train(["--task", task, "--model", demo_dir / "model", *data, "--output_dir", out, "--no_tqdm",
               "--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 2, "--max_eval_samples", 2,
               "--max_new_tokens", 4, "--num_workers", 0, "--logging_steps", 1])
    assert "train: 4 samples" in r.stdout
    assert_step_records(out, 2)
    ev = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert 0.0 <= ev[when]["accuracy"] <= 1.0 and ev[when]["n"] == 2
        # the predictions file of every preset; DocVQA's lines carry ANLS too
        preds = predictions(out / "predictions" / f"{when}.jsonl")
        eval_file = data[-1] if task == "jsonl" else preset_data / task / f"{task}_val.jsonl"
        assert [p["id"] for p in preds] == [json.loads(line)["id"] for line in eval_file.read_text().splitlines()[:2]]
        assert all(set(p) == {"id", "prediction", "answers", "correct"} | ({"anls"} if task == "docvqa" else set())
                   for p in preds)
        assert preds == ev[when]["examples"]
        assert ("anls" in ev[when]) == (task == "docvqa")
        if task == "docvqa":
            assert 0.0 <= ev[when]["anls"] <= 1.0
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()


# ---------------------------------------------------------------- bad input

def test_bad_cli_input_one_line_no_traceback(demo_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (demo_dir / "data" / "ucf101_train.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n{\"id\": \"x\", broken\n")
    (tmp_path / "images").symlink_to(demo_dir / "data" / "images")
    noimg = tmp_path / "noimg.jsonl"
    noimg.write_text(good + "\n" + good.replace("train/", "nowhere/") + "\n")
    m = ["--model", demo_dir / "model", "--no_tqdm", "--num_workers", 0]
    cases = {   # name: (argv, extra env, what the message must contain)
        "unknown task": (["--task", "nope"], {}, "nope"),
        "ucf101 without data": (["--task", "ucf101"], {}, "--data_dir"),
        "missing data dir": (["--task", "docvqa", "--data_dir", tmp_path / "absent"], {}, "absent"),
        "empty data dir": (["--task", "docvqa", "--data_dir", tmp_path], {}, "docvqa_train.jsonl"),
        "lora and full": (["--lora", "--full"], {}, "--full"),
        "bf16 and fp16": (["--bf16", "--fp16"], {}, "fp16"),
        "batch vs micro": (["--batch_size", 5, "--micro_batch_size", 2], {}, "divisible"),
        "batch vs world": (["--batch_size", 2, "--micro_batch_size", 2], {"WORLD_SIZE": "2"}, "world size 2"),
        # (run at once, so each in an output_dir of its own: one run per output_dir)
        "malformed jsonl": (["--task", "jsonl", "--train_file", bad, *m, "--output_dir", tmp_path / "o1"], {},
                            f"{bad}:2"),
        "missing image": (["--task", "jsonl", "--train_file", noimg, *m, "--output_dir", tmp_path / "o2"], {},
                          f"{noimg}:2"),
    }
    procs = {name: subprocess.Popen(command([str(a) for a in argv]), cwd=REPO, env={**ENV, **env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, env, _) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert p.returncode != 0, name
        assert "Traceback" not in err, f"{name}: traceback\n{err}"
        assert len(lines) == 1 and lines[0].startswith("train.py: error:"), f"{name}: not one line\n{err}"
        assert cases[name][2] in lines[0], f"{name}: {lines[0]}"


# ---------------------------------------------------------------- recipe aliases

def test_recipe_flag_aliases(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parse = train_py.parse_args
    assert parse(["--use_lora"]).mode == "lora"
    assert parse(["--use_qlora"]).mode == "qlora"
    assert parse(["--full_train"]).mode == "full"
    assert parse([]).mode == "lora"
    assert parse(["--freeze_vision_model"]).freeze_vision and parse(["--freeze_image_model"]).freeze_vision
    assert not parse([]).freeze_vision
    jsonl = ["--task", "jsonl", "--train_file", __file__]      # the demo takes no hub id (it downloads nothing)
    assert parse(jsonl + ["--model_name_or_path", "some/model"]).model == "some/model"
    c = parse(jsonl + ["--batch_size", "8", "--batch_size_per_gpu", "4"])
    assert (c.batch_size, c.micro_batch_size) == (8, 4)
    c = parse(jsonl + ["--lora_rank", "8", "--lora_alpha_ratio", "1.5"])
    assert c.lora_alpha == 12
    assert parse(jsonl).lora_alpha == 128   # 2 x rank 64
    assert parse(["--wd", "0.3"]).weight_decay == 0.3
    assert parse(["--no-tqdm"]).tqdm is False and parse(["--no_tqdm"]).tqdm is False
    assert parse(["--tqdm"]).tqdm is True and parse([]).tqdm is True
    c = parse(["--use_flash_attention"])
    assert c.use_flash_attention and c.bf16 and not c.fp16
    assert parse(["--resume"]).resume == "latest" and parse(["--resume", "/x/step-4"]).resume == "/x/step-4"
    assert parse(["--lora", "--use_lora"]).mode == "lora"      # the same mode twice is fine
    with pytest.raises(SystemExit):
        parse(["--use_lora", "--full_train"])
