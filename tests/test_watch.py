"""Watching a run: periodic evaluation (validation loss + task metric), the best checkpoint, early
stopping, the trackers (TensorBoard / Weights & Biases) and loss.png. The runs are train.py itself
on the demo (tiny model, 8 clips, 4 steps); evaluation must not change a bit of training."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from PIL import Image

from helpers import REPO, copy_truncated, differing, final_state, metrics, train

sys.path.insert(0, str(REPO))
import train as train_py  # noqa: E402
from phi3v import Phi3V, load_adapter  # noqa: E402

N = 4
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def args(demo_dir, out, steps=N) -> list:
    """The demo with dropout on (so the random streams must continue exactly), a loader worker,
    checkpoints at steps 2 and 4."""
    return ["--task", "demo", "--model", demo_dir / "model", "--data_dir", demo_dir / "data", "--output_dir", out,
            "--no_tqdm", "--batch_size", 4, "--micro_batch_size", 2, "--max_eval_samples", 4, "--max_new_tokens", 4,
            "--num_workers", 1, "--logging_steps", 1, "--max_steps", steps, "--save_steps", 2,
            "--keep_checkpoints", 5, "--lora_dropout", 0.1]


WATCH = ["--eval_steps", 2, "--save_best", "val_loss"] + (["--report_to", "wandb"] if HAVE_WANDB else [])


@pytest.fixture(scope="module")
def plain(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    train(args(demo_dir, out))
    return out


@pytest.fixture(scope="module")
def watched(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("watched") / "out"
    r = train(args(demo_dir, out) + WATCH, env=WANDB)
    return out, r


def evals(out) -> list[dict]:
    return [m for m in metrics(out) if "eval" in m]


def test_evaluation_changes_no_bit_of_training(plain, watched):
    out, _ = watched
    bad = differing(final_state(out, N), final_state(plain, N))
    assert not bad, f"the run with --eval_steps differs from the one without in {bad[:5]}"
    # the training records match too, but for the time measurements
    strip = lambda recs: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in recs if "loss" in m]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(plain))


def test_periodic_evaluations_best_checkpoint_and_plot(watched, demo_dir):
    out, r = watched
    ev = evals(out)
    assert [(e["step"], e["eval"]) for e in ev] == [(0, "before"), (2, "step"), (4, "step"), (4, "after")]
    for e in ev:
        assert e["val_loss"] > 0 and 0 <= e["accuracy"] <= 1 and e["n"] == 4
    assert ev[-1] == {**ev[-2], "eval": "after"}, "the evaluation at the last step is the one after training"
    assert json.loads((out / "eval.json").read_text())["after"]["val_loss"] == ev[-1]["val_loss"]
    # every evaluation's predictions; the one at the last step is also the one after training
    preds = out / "predictions"
    assert sorted(p.name for p in preds.iterdir()) == ["after.jsonl", "before.jsonl", "step-2.jsonl", "step-4.jsonl"]
    assert (preds / "after.jsonl").read_bytes() == (preds / "step-4.jsonl").read_bytes()
    assert [json.loads(line)["id"] for line in (preds / "step-2.jsonl").read_text().splitlines()] == [
        json.loads(line)["id"] for line in (demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()]
    # best/ holds the adapter of the evaluation with the lowest validation loss, with best.json
    best_step = min(ev[1:3], key=lambda e: e["val_loss"])["step"]
    assert json.loads((out / "best" / "best.json").read_text()) == {
        "step": best_step, "metric": "val_loss", "value": min(e["val_loss"] for e in ev[1:3])}
    m = Phi3V.from_pretrained(demo_dir / "model")
    load_adapter(m, out / "best")
    assert (out / "best" / "tokenizer.json").is_file()
    assert "best val_loss so far" in r.stdout and "eval at step 2: val_loss" in r.stdout
    # loss.png: the training and validation losses, and the task metric in a second panel
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG"
        if importlib.util.find_spec("matplotlib") is None:     # the Pillow drawing: look for each curve's colour
            colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
            for name in ("train loss", "validation loss", "accuracy"):
                assert Image.new("RGB", (1, 1), train_py.CURVES[name]).getpixel((0, 0)) in colours, name


def test_generate_loads_the_best_adapter(watched, demo_dir):
    import subprocess
    from helpers import ENV
    out, _ = watched
    frame = demo_dir / "data" / "images" / "val" / "Ball" / "v_Ball_g01_c01.0.jpg"
    p = subprocess.run([sys.executable, "-m", "phi3v.generate", "--model", str(demo_dir / "model"), "--adapter",
                        str(out / "best"), "--image", str(frame), "--prompt", "What is it?", "--max_new_tokens", "3"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def test_resume_with_evaluation_is_bitwise(watched, demo_dir, tmp_path):
    """Killed after checkpoint 2 (its evaluation and best/ already written): the resumed run ends
    bitwise where the uninterrupted one did, with the same evaluations and the same best."""
    out, _ = watched
    run = copy_truncated(out, tmp_path / "run", keep_step=2)
    r = train(args(demo_dir, run) + WATCH + ["--resume"], env=WANDB)
    assert "resumed from" in r.stdout
    bad = differing(final_state(run, N), final_state(out, N))
    assert not bad, f"resumed run differs from the uninterrupted one in {bad[:5]}"
    assert evals(run) == evals(out)
    assert (run / "best" / "best.json").read_text() == (out / "best" / "best.json").read_text()


def test_two_ranks_validation_loss_equals_one_rank(watched, demo_dir, tmp_path):
    """The validation loss is one token-weighted mean over the ranks' shares (4 samples in micro-batches
    of 2: one for each rank); only rank 0 logs."""
    out2 = tmp_path / "two"
    train(args(demo_dir, out2, steps=2) + WATCH, nproc=2, env=WANDB)
    one, two = evals(watched[0])[0], evals(out2)[0]          # before training: the same model
    assert two["eval"] == "before" and two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-12)
    if HAVE_WANDB:
        assert len(list((out2 / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_records_the_run(watched):
    out, _ = watched
    (run,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run.read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/grad_norm", b"train/tokens_per_s", b"eval/val_loss",
                b"eval/accuracy", b"learning_rate", b"save_best"):
        assert key in data, key


def test_report_to_names_the_missing_package(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train_py.parse_args(["--task", "demo", "--report_to", "wandb"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("train.py: error: --report_to wandb: the wandb package is not "
                                               "installed (pip install wandb)")


@pytest.mark.parametrize("argv, message", [
    (["--report_to", "mlflow"], "--report_to takes a comma list of tensorboard, wandb, none; got 'mlflow'"),
    (["--report_to", "none,wandb"], "'none' cannot be combined"),
    (["--save_best", "val_loss"], "--save_best needs --eval_steps N"),
    (["--eval_steps", "2", "--early_stopping", "2"], "--early_stopping needs --save_best METRIC"),
    (["--eval_steps", "2", "--save_best", "anls"], "ANLS is computed for --task docvqa only"),
    (["--eval_steps", "2", "--eval_only"], "--eval_only trains nothing"),
    (["--eval_steps", "-1"], "--eval_steps must be an integer >= 0"),
    (["--early_stopping", "0", "--eval_steps", "1", "--save_best", "accuracy"], "--early_stopping must be"),
])
def test_watch_flags_refused_where_they_would_do_nothing(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_py.parse_args(["--task", "demo"] + argv)
    assert message in capsys.readouterr().err


def test_early_stopping_stops_and_exports(demo_dir, tmp_path):
    """accuracy stays 0 for 4 steps of the tiny model: the first evaluation is the best, the next one
    does not improve on it, and --early_stopping 1 stops there; the run exports and is finished."""
    out = tmp_path / "out"
    a = args(demo_dir, out) + ["--eval_steps", 1, "--save_best", "accuracy", "--early_stopping", 1]
    r = train(a)
    assert "early stopping at step 2: accuracy has not improved for 1 evaluations (best 0.0000 at step 1" in r.stdout
    assert [(e["step"], e["eval"]) for e in evals(out)] == [(0, "before"), (1, "step"), (2, "step"), (2, "after")]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-2").is_dir()
    again = train(a + ["--resume"])
    assert "where it stopped early" in again.stdout and "nothing to do" in again.stdout


# ---------------------------------------------------------------- the best checkpoint, in-process

class Killed(BaseException):
    """What a kill looks like to the code it interrupts (nothing after it runs)."""


@pytest.fixture
def best_run(demo_dir, tmp_path):
    cfg = train_py.parse_args(["--task", "demo", "--model", str(demo_dir / "model"), "--data_dir",
                               str(demo_dir / "data"), "--output_dir", str(tmp_path / "out"), "--eval_steps", "2",
                               "--save_best", "val_loss"])
    (tmp_path / "out").mkdir()
    from phi3v import Processor, apply_lora
    model = apply_lora(Phi3V.from_pretrained(demo_dir / "model"), rank=4)
    return cfg, model, Processor.from_pretrained(demo_dir / "model")


def test_a_kill_while_writing_the_best_leaves_the_previous_one(best_run, monkeypatch):
    cfg, model, proc = best_run
    out = train_py.save_best(cfg, model, proc, 2, "val_loss", 3.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = train_py.save_adapter

    def dies_midway(model, path, **kw):
        real(model, path, **kw)
        (path / "adapter_model.safetensors").write_bytes(b"half")
        raise Killed
    monkeypatch.setattr(train_py, "save_adapter", dies_midway)
    with pytest.raises(Killed):
        train_py.save_best(cfg, model, proc, 4, "val_loss", 2.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert train_py.read_best(out.parent) == {"step": 2, "metric": "val_loss", "value": 3.0}


def test_a_kill_between_the_renames_is_recovered(best_run, monkeypatch):
    cfg, model, proc = best_run
    out = train_py.save_best(cfg, model, proc, 2, "val_loss", 3.0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = os.replace

    def second_rename_dies(a, b):
        calls.append(b)
        if str(b).endswith("/best"):
            raise Killed
        real(a, b)
    monkeypatch.setattr(train_py.os, "replace", second_rename_dies)
    with pytest.raises(Killed):
        train_py.save_best(cfg, model, proc, 4, "val_loss", 2.0)
    monkeypatch.undo()
    assert not out.exists() and (out.parent / ".old-best").is_dir(), "killed with no best/ in place"
    assert train_py.read_best(out.parent) == {"step": 2, "metric": "val_loss", "value": 3.0}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_best_direction_patience_and_restore(best_run):
    cfg, _, _ = best_run
    history = [{"step": 2, "eval": "step", "val_loss": 3.0}, {"step": 4, "eval": "step", "val_loss": 2.5},
               {"step": 6, "eval": "step", "val_loss": 2.7}, {"step": 8, "eval": "step", "val_loss": None}]
    best = train_py.Best(cfg, history, start_step=8)
    assert (best.step, best.value, best.since) == (4, 2.5, 2)
    best = train_py.Best(cfg, history, start_step=5)          # the evaluations the checkpoint had seen
    assert (best.step, best.value, best.since) == (4, 2.5, 0)
    assert not best.update(6, {"val_loss": 2.5}) and best.update(8, {"val_loss": 2.4})
    acc = train_py.Best(train_py.dataclasses.replace(cfg, save_best="accuracy", early_stopping=2),
                        [{"step": 2, "eval": "step", "accuracy": 0.5}], start_step=2)
    assert acc.update(4, {"accuracy": 0.6}) and not acc.update(6, {"accuracy": 0.6}) and not acc.stop
    assert not acc.update(8, {"accuracy": 0.1}) and acc.stop
