"""`python -m phi3v.generate --data FILE.jsonl --out PREDS.jsonl`: every record answered, in input order
whatever the length sorting; resumable (also after SIGKILL, also on 2 ranks) to the bytes of an
uninterrupted run; records without answers; the DocVQA submission; bad input as one line or skipped.
The demo's tiny untrained model (its answers differ from record to record), 3 new tokens."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import ENV, REPO, kill_when

from phi3v import Phi3V, Processor
from phi3v import generate as generate_cli
from phi3v.evaluate import (eval_inputs, evaluate, left_pad, length_batches, prompt_length, read_records,
                            write_predictions)

NEW = "3"        # --max_new_tokens


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def data_dir(demo_dir: Path, tmp: Path) -> Path:
    """A folder for jsonl files whose images/ is the demo's (a link: the demo data stays untouched)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "images").exists():
        (tmp / "images").symlink_to(demo_dir / "data" / "images")
    return tmp


def first_val(demo_dir: Path) -> dict:
    return json.loads((demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()[0])


def varied_records(demo_dir: Path) -> list[dict]:
    """12 records of different prompt lengths (1..4 frames, longer or shorter questions, a 2-turn
    conversation, one without images), shuffled so that input order and length order differ."""
    src = [json.loads(line) for f in ("ucf101_train.jsonl", "ucf101_val.jsonl")
           for line in (demo_dir / "data" / f).read_text().splitlines()]
    rng = random.Random(0)
    out = []
    for k, rec in enumerate(src):
        turn = rec["conversations"][0]
        frames = turn["images"][:1 + k % 4]
        user = turn["user"] + " Think." * (k // 4)
        out.append({"id": f"r{k:02d}", "source": "demo",
                    "conversations": [{"images": frames, "user": user, "assistant": f"answer-{k}"}]})
    out[3]["conversations"] = [{"images": src[3]["conversations"][0]["images"][:2], "user": "What moves?",
                                "assistant": "A shape."},
                               {"images": src[4]["conversations"][0]["images"][:1], "user": "And here?",
                                "assistant": "answer-3"}]
    out[5]["conversations"][0]["images"] = []
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def varied(demo_dir, tmp_path_factory):
    d = data_dir(demo_dir, tmp_path_factory.mktemp("varied"))
    return write_jsonl(d / "varied.jsonl", varied_records(demo_dir))


def args(demo_dir, data, out, *extra) -> list[str]:
    return ["--model", str(demo_dir / "model"), "--data", str(data), "--out", str(out), "--max_new_tokens", NEW,
            "--num_workers", "0", "--no_tqdm", *map(str, extra)]


def run(argv: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "phi3v.generate", *argv]
    else:
        # --standalone: torchrun picks a free port itself (no race with other runs for a port chosen here)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "phi3v.generate", *argv]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, varied, tmp_path_factory):
    """The reference: one uninterrupted run of `varied` at batch size 3 in a subprocess (1 thread, as
    the resumed and 2-rank runs below)."""
    out = tmp_path_factory.mktemp("ref") / "preds.jsonl"
    run(args(demo_dir, varied, out, "--batch_size", 3))
    return out


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_input_order_under_length_sorting(demo_dir, varied, tmp_path):
    """Batches are cut from the length-sorted records (4 per batch, left-padded, 2 workers), the file
    is in input order, and each line is its own record's answer, as this test computes it batch by
    batch. (Padding can change a row's answer: in the demo model a short prompt padded past
    original_max_position_embeddings (256) takes the long RoPE factors, as in the reference's
    batched generate; so the expected answers come from the same batches.)"""
    records = [json.loads(line) for line in varied.read_text().splitlines()]
    proc = Processor.from_pretrained(demo_dir / "model")
    lengths = [prompt_length(proc, r, varied.parent / "images", "x") for r in records]
    batches = length_batches(lengths, 4)
    order = [i for b in batches for i in b]
    assert order != list(range(len(records))) and len(set(lengths)) > 6        # the sort reorders
    out = tmp_path / "preds.jsonl"
    assert generate_cli.main(args(demo_dir, varied, out, "--batch_size", 4, "--num_workers", 2)) == 0
    got = lines_of(out)
    assert [g["id"] for g in got] == [r["id"] for r in records]
    model = Phi3V.from_pretrained(demo_dir / "model")
    expected = [None] * len(records)
    for b in batches:
        encs = [eval_inputs(proc, records[i], varied.parent / "images", "x") for i in b]
        new = model.generate(**left_pad(encs, proc.pad_token_id), max_new_tokens=int(NEW))
        for i, ids in zip(b, new):
            expected[i] = proc.decode(ids, skip_special_tokens=True)
    # the answers tell the records apart: answers written in batch (length) order would not match
    assert [expected[i] for i in order] != expected
    assert [g["prediction"] for g in got] == expected
    assert [g["answers"] for g in got] == [[r["conversations"][-1]["assistant"]] for r in records]
    assert all(g["correct"] is False and set(g) == {"id", "prediction", "answers", "correct"} for g in got)
    assert json.loads((tmp_path / "preds.metrics.json").read_text()) == {"accuracy": 0.0, "n": len(records)}


def test_evaluate_and_generate_data_agree_in_input_order(demo_dir, varied, tmp_path):
    """train.py's evaluation (phi3v.evaluate.evaluate + write_predictions) and --data run the same
    batches: the same predictions file, in input order although the batches are length-sorted."""
    records = read_records(varied, unanswered=True)[0]
    model, proc = Phi3V.from_pretrained(demo_dir / "model"), Processor.from_pretrained(demo_dir / "model")
    res = evaluate(model, proc, records, varied.parent / "images", batch_size=3, max_new_tokens=int(NEW))
    assert [p["id"] for p in res["predictions"]] == [rec["id"] for _, rec in records]
    assert res["examples"] == res["predictions"][:5] and res["n"] == len(records)
    path = write_predictions(tmp_path / "run", "step-7", res["predictions"])
    assert path == tmp_path / "run" / "predictions" / "step-7.jsonl"
    assert generate_cli.main(args(demo_dir, varied, tmp_path / "p.jsonl", "--batch_size", 3)) == 0
    assert path.read_bytes() == (tmp_path / "p.jsonl").read_bytes()


def batches_of(demo_dir, data: Path, batch_size: int) -> list[list[int]]:
    records = [json.loads(line) for line in data.read_text().splitlines()]
    proc = Processor.from_pretrained(demo_dir / "model")
    return length_batches([prompt_length(proc, r, data.parent / "images", "x") for r in records], batch_size)


def test_resume_skips_answered_batches_to_the_same_bytes(demo_dir, varied, uninterrupted, tmp_path, monkeypatch,
                                                         capsys):
    """What a kill leaves behind (lines of whole and partly written batches, in any order, the last
    line cut) is completed to the uninterrupted run's bytes, answering only the unfinished batches;
    then an identical call loads no model and touches no file."""
    ref = uninterrupted.read_bytes()
    lines = ref.decode().splitlines(keepends=True)
    records = varied.read_text().splitlines()
    batches = batches_of(demo_dir, varied, 3)
    # batches 0 and 2 written whole, batch 1 one line of three, batch 3 a line cut by the kill
    kept = batches[0] + batches[2] + batches[1][:1]
    partial = "".join(lines[i] for i in reversed(kept)) + lines[batches[3][0]][:25]
    out = tmp_path / "preds.jsonl"
    out.write_text(partial)
    assert generate_cli.main(args(demo_dir, varied, out, "--batch_size", 3)) == 0
    said = capsys.readouterr().out
    assert f"6 of {len(records)} records already answered; answering the other {len(records) - 6}" in said
    assert out.read_bytes() == ref
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every record is answered")
    monkeypatch.setattr(Phi3V, "from_pretrained", no_model)
    assert generate_cli.main(args(demo_dir, varied, out, "--batch_size", 3)) == 0
    said = capsys.readouterr().out
    assert "nothing to do" in said and "accuracy 0.0000 over the 12 records" in said
    assert out.read_bytes() == ref
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp


def test_sigkill_then_resume_is_byte_identical(demo_dir, varied, uninterrupted, tmp_path):
    """A real kill (SIGKILL while lines are being appended), then the same command again."""
    for attempt in range(3):
        out, log = tmp_path / f"preds{attempt}.jsonl", tmp_path / f"log{attempt}"
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "phi3v.generate",
                                  *args(demo_dir, varied, out, "--batch_size", 3)],
                                 cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        kill_when(p, lambda: out.exists() and out.read_bytes().count(b"\n") >= 3, log)
        if out.read_bytes().count(b"\n") < 12:
            break
    else:
        pytest.fail("could not land a SIGKILL before the run finished in 3 tries")
    r = run(args(demo_dir, varied, out, "--batch_size", 3))
    assert "records already answered; answering the other" in r.stdout
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_two_ranks_share_the_batches_and_resume(demo_dir, varied, uninterrupted, tmp_path):
    """torchrun, 2 ranks (gloo): each answers every other remaining batch, rank 0 writes one file in
    input order; started from a partly written file, it ends with the 1-rank run's bytes."""
    lines = uninterrupted.read_text().splitlines(keepends=True)
    b = batches_of(demo_dir, varied, 3)
    out = tmp_path / "preds.jsonl"
    # batch 1 whole, one line of batch 2, a cut line: batches 0 and 3 go to rank 0, batch 2 to rank 1
    out.write_text("".join(lines[i] for i in b[1] + b[2][:1]) + lines[b[3][0]][:10])
    r = run(args(demo_dir, varied, out, "--batch_size", 3), nproc=2)
    assert "2 rank(s)" in r.stdout and "answering 9 records" in r.stdout and "answered 9 records in" in r.stdout
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_records_without_answers(demo_dir, tmp_path):
    """A test split: the last turn's answer missing, null or empty is answered and not scored
    (answers/correct null); earlier turns need theirs (the history)."""
    d = data_dir(demo_dir, tmp_path)
    frames = first_val(demo_dir)["conversations"][0]["images"]
    recs = [{"id": "a", "source": "demo", "conversations": [{"images": frames[:2], "user": "Which class?"}]},
            {"id": "b", "source": "demo", "conversations": [{"images": frames[:1], "user": "Q", "assistant": ""}]},
            {"id": "c", "source": "demo", "conversations": [{"images": frames[:1], "user": "Q", "assistant": "x"},
                                                            {"images": [], "user": "Q2", "assistant": None}]},
            {"id": "d", "source": "demo", "conversations": [{"images": frames[:1], "user": "Q", "assistant": "Ball"}]}]
    out = d / "preds.jsonl"
    assert generate_cli.main(args(demo_dir, write_jsonl(d / "test.jsonl", recs), out)) == 0
    got = lines_of(out)
    assert [g["id"] for g in got] == ["a", "b", "c", "d"]
    assert [(g["answers"], g["correct"]) for g in got[:3]] == [(None, None)] * 3
    assert got[3]["answers"] == ["Ball"] and got[3]["correct"] is False
    assert json.loads((d / "preds.metrics.json").read_text())["n"] == 1
    # none answered: nothing to score, no metrics file
    out2 = d / "none.jsonl"
    assert generate_cli.main(args(demo_dir, write_jsonl(d / "test2.jsonl", recs[:3]), out2)) == 0
    assert len(lines_of(out2)) == 3 and not (d / "none.metrics.json").exists()
    # an unanswered earlier turn is an error naming file:line and field
    bad = recs[2] | {"conversations": [{"images": [], "user": "Q"}, {"images": [], "user": "Q2"}]}
    f = write_jsonl(d / "bad.jsonl", recs[:1] + [bad])
    with pytest.raises(ValueError, match=rf"^{f}:2: field 'conversations\[0\]\.assistant': missing"):
        generate_cli.main(args(demo_dir, f, d / "bad_preds.jsonl"))


def test_docvqa_submission_and_anls(demo_dir, tmp_path):
    d = data_dir(demo_dir, tmp_path)
    frames = first_val(demo_dir)["conversations"][0]["images"]

    def rec(rid, k, **extra):
        return {"id": rid, "source": "docvqa", "conversations": [{"images": [frames[k]], "user": f"Question {k}?\n"
                "Answer briefly.", "assistant": f"a{k}"}], "answers": [f"a{k}", f"A{k}"], **extra}
    recs = [rec("57349", 0), rec("val-7", 1, questionId=12), rec("3", 2), rec("100", 3)]
    data = write_jsonl(d / "docvqa_val.jsonl", recs)
    out = d / "preds.jsonl"
    assert generate_cli.main(args(demo_dir, data, out, "--format", "docvqa", "--batch_size", 2)) == 0
    got = lines_of(out)
    assert all(set(g) == {"id", "prediction", "answers", "correct", "anls"} for g in got)
    assert got[0]["answers"] == ["a0", "A0"] and all(g["anls"] == 0.0 for g in got)
    sub = json.loads((d / "preds.submission.json").read_text())
    assert sub == [{"questionId": q, "answer": g["prediction"].strip()} for q, g in zip([57349, 12, 3, 100], got)]
    assert all(type(s["questionId"]) is int for s in sub)
    assert json.loads((d / "preds.metrics.json").read_text()) == {"accuracy": 0.0, "n": 4, "anls": 0.0}
    # ANLS also without --format when every record is a converted DocVQA one; no submission then
    out2 = d / "plain.jsonl"
    assert generate_cli.main(args(demo_dir, data, out2, "--batch_size", 2)) == 0
    assert "anls" in lines_of(out2)[0] and not (d / "plain.submission.json").exists()
    bad = write_jsonl(d / "bad.jsonl", recs[:2] + [rec("val-0000000001", 0)])
    with pytest.raises(ValueError, match=rf"^{bad}:3: --format docvqa needs the record's DocVQA questionId"):
        generate_cli.main(args(demo_dir, bad, d / "bad_preds.jsonl", "--format", "docvqa"))


# ---------------------------------------------------------------- bad input

def bad_input_files(demo_dir: Path, d: Path) -> tuple[Path, list[dict]]:
    """A file with a line that does not parse (2), a missing image (3), a prompt longer than the
    model's context (5) and a repeated id (6) among good records."""
    good = [json.loads(line) for line in (demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()]
    for r in good:
        r["conversations"][0]["images"] = r["conversations"][0]["images"][:1]
    missing = json.loads(json.dumps(good[1])) | {"id": "missing"}
    missing["conversations"][0]["images"] = ["val/Ball/nope.jpg"]
    long = json.loads(json.dumps(good[2])) | {"id": "long"}
    long["conversations"][0]["user"] = "word " * 2000          # > 8192 - 3 tokens (demo config)
    lines = [json.dumps(good[0]), '{"id": "broken", "source": "demo", "conv', json.dumps(missing),
             json.dumps(good[1]), json.dumps(long), json.dumps(good[0] | {"source": "again"}), json.dumps(good[2])]
    f = d / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f, [good[0], good[1], good[2]]


def test_bad_input_one_line_naming_file_and_line(demo_dir, tmp_path):
    d = data_dir(demo_dir, tmp_path)
    f, good = bad_input_files(demo_dir, d)
    lines = f.read_text().splitlines()
    cases = {
        "does not parse": ([0, 1], "2: invalid JSON"),
        "missing image": ([0, 2], f"2: image 'val/Ball/nope.jpg' not found (looked for {d / 'images'}"),
        "too long": ([0, 4], "2: the prompt has "),
        "repeated id": ([0, 5], f"2: id '{good[0]['id']}' repeats the one of "),
    }
    procs = {}
    for name, (keep, _) in cases.items():
        g = d / f"{name.replace(' ', '_')}.jsonl"
        g.write_text("\n".join(lines[i] for i in keep) + "\n")
        procs[name] = (g, subprocess.Popen([sys.executable, "-m", "phi3v.generate",
                                            *args(demo_dir, g, d / f"{g.stem}_preds.jsonl")],
                                           cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE))
    for name, (g, p) in procs.items():
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, f"{name}: {err}"
        assert err.startswith(f"phi3v.generate: error: {g}:{cases[name][1]}"), f"{name}: {err}"


def test_too_long_prompt_names_count_and_limit(demo_dir, tmp_path):
    d = data_dir(demo_dir, tmp_path)
    f, _ = bad_input_files(demo_dir, d)
    g = write_jsonl(d / "long.jsonl", [json.loads(f.read_text().splitlines()[4])])
    with pytest.raises(ValueError, match=rf"^{g}:1: the prompt has \d+ tokens, more than the 8189 the model can "
                                         r"take \(8192 positions - --max_new_tokens 3\)$"):
        generate_cli.main(args(demo_dir, g, d / "p.jsonl"))


def test_skip_bad_records_lists_them_and_answers_the_rest(demo_dir, tmp_path, capsys):
    d = data_dir(demo_dir, tmp_path)
    f, good = bad_input_files(demo_dir, d)
    out = d / "preds.jsonl"
    assert generate_cli.main(args(demo_dir, f, out, "--skip_bad_records")) == 0
    said = capsys.readouterr().out
    assert "skipped 4 bad record(s)" in said
    for line_no in (2, 3, 5, 6):
        assert f"  {f}:{line_no}: " in said
    assert [g["id"] for g in lines_of(out)] == [r["id"] for r in good]


def test_data_arguments(demo_dir, tmp_path, capsys):
    d = data_dir(demo_dir, tmp_path)
    data = write_jsonl(d / "one.jsonl", [first_val(demo_dir)])
    base = ["--model", str(demo_dir / "model")]
    cases = {
        "no --out": (base + ["--data", str(data)], "--data needs --out"),
        "both": (base + ["--data", str(data), "--out", str(d / "o.jsonl"), "--prompt", "x"], "give --prompt"),
        "image": (base + ["--data", str(data), "--out", str(d / "o.jsonl"), "--image", str(data)], "--image is for"),
        "out is data": (base + ["--data", str(data), "--out", str(data)], "is the --data file itself"),
        "no such data": (base + ["--data", str(d / "nope.jsonl"), "--out", str(d / "o.jsonl")], "no such file"),
        "out without data": (base + ["--prompt", "x", "--out", str(d / "o.jsonl")], "--out goes with --data"),
        "batch without data": (base + ["--prompt", "x", "--batch_size", "4"], "--batch_size goes with --data"),
        "workers without data": (base + ["--prompt", "x", "--num_workers", "0"], "--num_workers goes with --data"),
        "batch 0": (base + ["--data", str(data), "--out", str(d / "o.jsonl"), "--batch_size", "0"], "--batch_size"),
    }
    for name, (argv, expect) in cases.items():
        with pytest.raises(SystemExit) as e:
            generate_cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expect in err, f"{name}: {err}"
    # an --out that is not this dataset's predictions is refused, not overwritten
    other = d / "other.jsonl"
    other.write_text('{"id": "elsewhere", "prediction": "x"}\n')
    with pytest.raises(ValueError, match=rf"^{other}:1: id 'elsewhere' is not a record of --data"):
        generate_cli.main(args(demo_dir, data, other))
    assert other.read_text() == '{"id": "elsewhere", "prediction": "x"}\n'


def test_image_that_fails_to_decode_in_a_batch(demo_dir, tmp_path, capsys):
    """An image whose header reads but whose data is cut: one line naming file:line (from inside a
    data-loader worker), or with --skip_bad_records the record is left out of its batch and the
    other rows get the answers they get in a batch without it."""
    src = [json.loads(line) for line in (demo_dir / "data" / "ucf101_val.jsonl").read_text().splitlines()[:3]]
    d = tmp_path / "data"
    for r in src:
        r["conversations"][0]["images"] = r["conversations"][0]["images"][:2]
        for rel in r["conversations"][0]["images"]:
            (d / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / "images" / rel).write_bytes((demo_dir / "data" / "images" / rel).read_bytes())
    # a PNG cut in its image data: the header (size) reads, decoding fails
    frame = d / "images" / src[1]["conversations"][0]["images"][0]
    buf = io.BytesIO()
    Image.open(frame).save(buf, format="PNG")
    cut = frame.with_suffix(".png")
    cut.write_bytes(buf.getvalue()[:len(buf.getvalue()) * 2 // 3])
    src[1]["conversations"][0]["images"][0] = cut.relative_to(d / "images").as_posix()
    data = write_jsonl(d / "cut.jsonl", src)
    with pytest.raises(ValueError) as e:
        generate_cli.main(args(demo_dir, data, d / "p.jsonl", "--num_workers", 1))
    from phi3v.cli import message
    assert message(e.value).startswith(f"{data}:2: image '{src[1]['conversations'][0]['images'][0]}': cannot decode")
    out = d / "skip.jsonl"
    assert generate_cli.main(args(demo_dir, data, out, "--num_workers", 1, "--skip_bad_records")) == 0
    assert f"skipped (--skip_bad_records): {data}:2: image" in capsys.readouterr().out
    without = write_jsonl(d / "without.jsonl", [src[0], src[2]])
    assert generate_cli.main(args(demo_dir, without, d / "ref.jsonl")) == 0
    assert out.read_bytes() == (d / "ref.jsonl").read_bytes() and len(lines_of(out)) == 2
