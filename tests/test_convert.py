"""convert/: every converter on tiny raw inputs built here, checked exactly."""
import base64
import io
import json
import subprocess
import tarfile
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convert import check, docvqa, hateful_memes, llava, nlvr2, sharegpt, ucf101
from convert.common import ConvertError
from phi3v.schema import iter_jsonl, validate_record

av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from helpers import make_video  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEP = 12  # frame i of a make_video video has red = i * STEP


# ---------------------------------------------------------------- helpers

def frame_index(jpg: Path) -> int:
    return round(float(np.asarray(Image.open(jpg))[..., 0].mean()) / STEP)


def png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=(0, 0, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(color))


def read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_parquet(path: Path, rows: list):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def cauldron_row(images: list, qa: list) -> dict:
    return {"images": [{"bytes": b, "path": None} for b in images],
            "texts": [{"user": u, "assistant": a, "source": "test"} for u, a in qa]}


# ---------------------------------------------------------------- schema

def test_validate_record_names_where_and_field():
    good = {"id": "x", "source": "s", "conversations": [{"images": ["a.jpg"], "user": "q", "assistant": "a"}]}
    validate_record(good, "f.jsonl:3")
    bad_cases = [
        ({**good, "id": 5}, "'id'"),
        ({k: v for k, v in good.items() if k != "source"}, "'source': missing"),
        ({**good, "conversations": []}, "'conversations'"),
        ({**good, "conversations": [{"images": ["../a.jpg"], "user": "q", "assistant": "a"}]},
         "'conversations[0].images[0]'"),
        ({**good, "conversations": [{"images": [], "user": "<|image_1|>\nq", "assistant": "a"}]},
         "'conversations[0].user'"),
        ({**good, "conversations": [{"images": [], "user": "q", "assistant": ""}]},
         "'conversations[0].assistant'"),
    ]
    for rec, field in bad_cases:
        with pytest.raises(ValueError) as e:
            validate_record(rec, "f.jsonl:3")
        assert str(e.value).startswith("f.jsonl:3: ") and field in str(e.value), str(e.value)


def test_iter_jsonl_reports_broken_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"b": 2}\n{broken\n', encoding="utf-8")
    it = iter_jsonl(p)
    assert next(it) == (1, {"a": 1})
    assert next(it) == (3, {"b": 2})
    with pytest.raises(ValueError, match=r"a\.jsonl:4: invalid JSON"):
        next(it)


# ---------------------------------------------------------------- UCF-101

FRAMES = {  # (split, class, stem) -> frame count
    ("train", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01"): 10,
    ("train", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g02_c01"): 13,
    ("train", "Archery", "v_Archery_g01_c01"): 16,
    ("val", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g03_c01"): 20,
    ("val", "Archery", "v_Archery_g02_c01"): 8,
    ("test", "Archery", "v_Archery_g03_c01"): 11,
}


@pytest.fixture(scope="module")
def ucf_src(tmp_path_factory):
    """UCF101_subset layout inside a parent folder, plus one corrupt, one short, one mkv-in-avi video."""
    top = tmp_path_factory.mktemp("ucf_raw")
    root = top / "UCF101_subset"
    for (split, cls, stem), n in FRAMES.items():
        make_video(root / split / cls / f"{stem}.avi", n)
    (root / "train" / "Archery" / "v_Archery_g00_c09.avi").write_bytes(b"not a video")   # unreadable
    make_video(root / "val" / "Archery" / "v_Archery_g09_c01.avi", 5)                     # too short
    make_video(root / "test" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g04_c01.avi", 12, container="matroska")  # no frame count
    (root / "test" / "ApplyEyeMakeup" / "notes.txt").write_text("ignored")
    return top


def test_frame_indices_match_recipe_formula():
    for total in (8, 10, 13, 16, 20, 300):
        assert ucf101.frame_indices(total, 8) == list(np.arange(0, total, total / 8).astype(int))
    assert ucf101.frame_indices(17, 7) == [0, 2, 4, 7, 9, 12, 14]  # numpy gives an 8th index (17) here


def test_ucf101_records_frames_and_skips(ucf_src, tmp_path):
    out = tmp_path / "out"
    stats = ucf101.convert(ucf_src, out, workers=2)
    assert stats["records"] == {"ucf101_test.jsonl": 2, "ucf101_train.jsonl": 3, "ucf101_val.jsonl": 2}
    assert stats["skipped"] == 2 and stats["images"] == 7 * 8
    prompt = "Classify the video into one of the following classes: ApplyEyeMakeup, Archery."
    # Global counter over all listed videos, train then val then test, sorted; skips leave gaps.
    expected = {
        "train": [("train-0000000000", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01"),
                  ("train-0000000001", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g02_c01"),
                  ("train-0000000003", "Archery", "v_Archery_g01_c01")],
        "val": [("val-0000000004", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g03_c01"),
                ("val-0000000005", "Archery", "v_Archery_g02_c01")],
        "test": [("test-0000000007", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g04_c01"),
                 ("test-0000000008", "Archery", "v_Archery_g03_c01")],
    }
    for split, rows in expected.items():
        recs = read(out / f"ucf101_{split}.jsonl")
        assert [r["id"] for r in recs] == [rid for rid, _, _ in rows]
        for rec, (rid, cls, stem) in zip(recs, rows):
            assert list(rec) == ["id", "source", "conversations"] and rec["source"] == "ucf101"
            (turn,) = rec["conversations"]
            assert turn["user"] == prompt and turn["assistant"] == cls
            assert turn["images"] == [f"{split}/{cls}/{stem}.{k}.jpg" for k in range(8)]
            total = FRAMES.get((split, cls, stem), 12)
            want = [int(i) for i in np.arange(0, total, total / 8).astype(int)]
            got = [frame_index(out / "images" / p) for p in turn["images"]]
            assert got == want, (stem, got, want)
            assert Image.open(out / "images" / turn["images"][0]).format == "JPEG"
    skipped = read(out / "skipped.jsonl")
    assert [(s["file"], s["id"]) for s in skipped] == [
        ("train/Archery/v_Archery_g00_c09.avi", "train-0000000002"),
        ("val/Archery/v_Archery_g09_c01.avi", "val-0000000006")]
    assert skipped[0]["reason"].startswith("unreadable video")
    assert skipped[1]["reason"] == "has 5 frames, fewer than num_frames=8"
    assert not (out / "images" / "val" / "Archery" / "v_Archery_g09_c01.0.jpg").exists()
    for split in ("train", "val", "test"):
        s = check.check(out / f"ucf101_{split}.jsonl")
        assert s["problems"] == [] and s["images"] == 8 * s["records"]


def test_ucf101_deterministic_classes_and_strict(ucf_src, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ucf101.convert(ucf_src / "UCF101_subset", a, num_frames=4, classes=["Archery"])
    ucf101.convert(ucf_src, b, num_frames=4, classes=["Archery"], workers=2)
    assert tree_bytes(a) == tree_bytes(b)
    recs = read(a / "ucf101_train.jsonl")
    assert [r["conversations"][0]["assistant"] for r in recs] == ["Archery"]
    assert recs[0]["conversations"][0]["user"] == "Classify the video into one of the following classes: Archery."
    assert [frame_index(a / "images" / p) for p in recs[0]["conversations"][0]["images"]] == [0, 4, 8, 12]
    with pytest.raises(ConvertError, match="v_Archery_g00_c09.avi"):
        ucf101.convert(ucf_src, tmp_path / "c", strict=True)
    with pytest.raises(ConvertError, match="Basketball"):
        ucf101.convert(ucf_src, tmp_path / "d", classes=["Basketball"])


def test_ucf101_from_recipe_archive(ucf_src, tmp_path):
    """The recipe's UCF101_subset.tar.gz (alone in a hub-snapshot-like folder) converts like the tree."""
    snap = tmp_path / "snapshot"
    snap.mkdir()
    with tarfile.open(snap / "UCF101_subset.tar.gz", "w:gz") as tar:
        tar.add(ucf_src / "UCF101_subset", arcname="UCF101_subset")
    (snap / "README.md").write_text("hub card")
    ucf101.convert(snap, tmp_path / "a", classes=["Archery"])
    ucf101.convert(ucf_src, tmp_path / "b", classes=["Archery"])
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert [r["id"] for r in read(tmp_path / "a" / "ucf101_val.jsonl")] == ["val-0000000002"]


def test_ucf101_cli(ucf_src, tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert.ucf101", "--src", str(ucf_src), "--out_dir",
                        str(tmp_path / "o"), "--classes", "Archery,ApplyEyeMakeup", "--no_progress"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2 and "skipped.jsonl" in r.stderr
    rec = read(tmp_path / "o" / "ucf101_val.jsonl")[0]
    assert rec["conversations"][0]["user"].endswith("classes: Archery, ApplyEyeMakeup.")
    r = subprocess.run([sys.executable, "-m", "convert.ucf101", "--src", str(ucf_src), "--out_dir",
                        str(tmp_path / "s"), "--strict", "--no_progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "error:" in r.stderr and "v_Archery_g00_c09.avi" in r.stderr


# ---------------------------------------------------------------- DocVQA

def docvqa_row(id, color, q, answers):
    return {"id": id, "image": {"bytes": png(color), "path": f"{id}.png"}, "query": {"en": q, "de": "x"},
            "answers": answers, "words": ["w"], "bounding_boxes": [[0.0, 0.0, 1.0, 1.0]]}


def test_docvqa_parquet_and_official_json(tmp_path):
    src = tmp_path / "raw"
    write_parquet(src / "data" / "train-00000-of-00001.parquet", [
        docvqa_row("q1", (10, 0, 0), "What is the date?", ["1 May", "May 1"]),
        docvqa_row("q2", (20, 0, 0), "Who signed?", ["Bob"]),
        docvqa_row("q3", (30, 0, 0), "Empty?", []),
    ])
    write_parquet(src / "data" / "test-00000-of-00001.parquet", [docvqa_row("t1", (40, 0, 0), "Total?", ["$5"])])
    write_png(src / "val" / "documents" / "doc1.png")
    (src / "val" / "val_v1.0.json").write_text(json.dumps({"dataset_split": "val", "data": [
        {"questionId": 7, "question": "Title?", "image": "documents/doc1.png", "answers": ["Report", "report"]},
        {"questionId": 8, "question": "Page?", "image": "documents/doc1.png", "answers": ["2"]},
        {"questionId": 9, "question": "Lost?", "image": "documents/missing.png", "answers": ["x"]},
        {"questionId": 7, "question": "Again?", "image": "documents/doc1.png", "answers": ["y"]},
    ]}, indent=2))
    (src / "val" / "ocr_results").mkdir()
    (src / "val" / "ocr_results" / "doc1.json").write_text("{}")  # not a split file: ignored
    out = tmp_path / "out"
    stats = docvqa.convert(src, out)
    assert stats["records"] == {"docvqa_test.jsonl": 1, "docvqa_train.jsonl": 2, "docvqa_val.jsonl": 2}
    train = read(out / "docvqa_train.jsonl")
    assert train[0] == {"id": "q1", "source": "docvqa", "conversations": [
        {"images": ["train/q1.png"], "user": "What is the date?\nAnswer briefly.", "assistant": "1 May"}],
        "answers": ["1 May", "May 1"]}
    assert (out / "images" / "train" / "q1.png").read_bytes() == png((10, 0, 0))
    val = read(out / "docvqa_val.jsonl")
    assert [(r["id"], r["conversations"][0]["images"], r["conversations"][0]["user"], r["answers"]) for r in val] == [
        ("7", ["val/documents/doc1.png"], "Title?\nAnswer briefly.", ["Report", "report"]),
        ("8", ["val/documents/doc1.png"], "Page?\nAnswer briefly.", ["2"])]
    reasons = [(s["file"], s["line"], s["id"], s["reason"].split(":")[0]) for s in read(out / "skipped.jsonl")]
    assert reasons == [("data/train-00000-of-00001.parquet", "row 2", "q3", "no answers (unlabelled split)"),
                       ("val/val_v1.0.json", "item 2", "9", "image not found"),
                       ("val/val_v1.0.json", "item 3", "7", "duplicate id '7' in docvqa_val.jsonl")]
    again = tmp_path / "again"
    docvqa.convert(src, again)
    assert tree_bytes(out) == tree_bytes(again)
    with pytest.raises(ConvertError, match=r"row 2: no answers"):
        docvqa.convert(src, tmp_path / "strict", strict=True)


def test_docvqa_cauldron_multi_qa(tmp_path):
    write_parquet(tmp_path / "docvqa" / "train-00000-of-00002.parquet",
                  [cauldron_row([png((5, 5, 5))], [("Q1?", "A1"), ("Q2?", "A2")])])
    write_parquet(tmp_path / "docvqa" / "train-00001-of-00002.parquet",
                  [cauldron_row([png((6, 6, 6))], [("Q3?", "A3")])])
    out = tmp_path / "out"
    assert docvqa.convert(tmp_path, out)["records"] == {"docvqa_train.jsonl": 2}
    r0, r1 = read(out / "docvqa_train.jsonl")
    assert r0["conversations"] == [{"images": ["train/train-0000000000.0.png"], "user": "Q1?", "assistant": "A1"},
                                   {"images": [], "user": "Q2?", "assistant": "A2"}]
    assert r1["id"] == "train-0000000001" and (out / "images" / "train" / "train-0000000001.0.png").exists()


# ---------------------------------------------------------------- hateful memes

def test_hateful_memes_facebook_release(tmp_path):
    src = tmp_path / "hm"
    for i in (1, 2, 3):
        write_png(src / "img" / f"{i:05d}.png", (i, i, i))
    lines = [json.dumps({"id": 1, "img": "img/00001.png", "label": 1, "text": "über text"}, ensure_ascii=False),
             json.dumps({"id": 2, "img": "img/00002.png", "label": 0, "text": "nice day"}),
             "{not json",
             json.dumps({"id": 4, "img": "img/00004.png", "label": 0, "text": "gone"})]
    (src / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "dev_seen.jsonl").write_text(json.dumps({"id": 3, "img": "img/00003.png", "label": 0, "text": "t"}) + "\n")
    (src / "dev_unseen.jsonl").write_text(json.dumps({"id": 3, "img": "img/00003.png", "label": 0, "text": "t"}) + "\n")
    (src / "test.jsonl").write_text(json.dumps({"id": 2, "img": "img/00002.png", "text": "nice day"}) + "\n")
    out = tmp_path / "out"
    stats = hateful_memes.convert(src, out)
    assert stats["records"] == {"hateful_memes_train.jsonl": 2, "hateful_memes_val.jsonl": 1,
                                "hateful_memes_val_unseen.jsonl": 1}
    train = read(out / "hateful_memes_train.jsonl")
    assert train[0] == {"id": "1", "source": "hateful_memes", "conversations": [{
        "images": ["img/00001.png"],
        "user": 'The text on this meme reads: "über text"\nIs this meme hateful? Answer yes or no.',
        "assistant": "yes"}]}
    assert train[1]["conversations"][0]["assistant"] == "no"
    assert "über" in (out / "hateful_memes_train.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False
    skipped = read(out / "skipped.jsonl")
    assert [(s["file"], s["line"], s["reason"].split(":")[0]) for s in skipped] == [
        ("test.jsonl", 1, "no 0/1 label (got None)"),
        ("train.jsonl", 3, "broken JSON line"),
        ("train.jsonl", 4, "image not found")]
    assert check.check(out / "hateful_memes_val.jsonl")["problems"] == []
    with pytest.raises(ConvertError, match=r"test\.jsonl:1: no 0/1 label"):
        hateful_memes.convert(src, tmp_path / "strict", strict=True)


def test_hateful_memes_cauldron(tmp_path):
    rows = [cauldron_row([png((i, 0, 0))], [(f"Is meme {i} hateful?", "no" if i % 2 else "yes")]) for i in range(3)]
    rows.append(cauldron_row([b"junk"], [("q", "a")]))
    write_parquet(tmp_path / "hateful_memes" / "train-00000-of-00001.parquet", rows)
    out = tmp_path / "out"
    stats = hateful_memes.convert(tmp_path / "hateful_memes", out, val_rows=1)
    assert stats["records"] == {"hateful_memes_train.jsonl": 2, "hateful_memes_val.jsonl": 1}
    (val,) = read(out / "hateful_memes_val.jsonl")
    assert val == {"id": "val-0000000000", "source": "hateful_memes", "conversations": [
        {"images": ["val/val-0000000000.0.png"], "user": "Is meme 0 hateful?", "assistant": "yes"}]}
    assert [r["id"] for r in read(out / "hateful_memes_train.jsonl")] == ["train-0000000001", "train-0000000002"]
    assert read(out / "skipped.jsonl")[0]["line"] == "row 3"


# ---------------------------------------------------------------- NLVR2

def test_nlvr2_official_release(tmp_path):
    src = tmp_path / "nlvr"
    for name, color in [("dev-1-0-img0", (1, 0, 0)), ("dev-1-0-img1", (2, 0, 0)), ("dev-2-3-img0", (3, 0, 0))]:
        write_png(src / "images" / "dev" / f"{name}.png", color)
    write_png(src / "images" / "train" / "12" / "train-5-1-img0.png", (4, 0, 0))
    write_png(src / "images" / "train" / "12" / "train-5-1-img1.png", (5, 0, 0))
    dev = [{"identifier": "dev-1-0-0", "sentence": "Two dogs.", "label": "True", "left_url": "http://l"},
           {"identifier": "dev-1-0-1", "sentence": "No dogs.", "label": "False"},
           {"identifier": "dev-2-3-0", "sentence": "A cat.", "label": "True", "right_url": "http://r/x.png"},
           {"identifier": "dev-1-0-1", "sentence": "Dup.", "label": "True"}]
    (src / "dev.json").write_text("".join(json.dumps(d) + "\n" for d in dev))
    (src / "train.json").write_text(json.dumps({"identifier": "train-5-1-2", "sentence": "S", "label": "False",
                                                "directory": "12"}) + "\n")
    out = tmp_path / "out"
    stats = nlvr2.convert(src, out)
    assert stats["records"] == {"nlvr2_train.jsonl": 1, "nlvr2_val.jsonl": 2}
    val = read(out / "nlvr2_val.jsonl")
    assert val[0] == {"id": "dev-1-0-0", "source": "nlvr2", "conversations": [{
        "images": ["val/dev-1-0-img0.png", "val/dev-1-0-img1.png"],
        "user": 'Is this statement about the left and right images true or false? "Two dogs."\nAnswer true or false.',
        "assistant": "true"}]}
    assert val[1]["conversations"][0]["assistant"] == "false"
    assert (out / "images" / "val" / "dev-1-0-img1.png").read_bytes() == png((2, 0, 0))
    assert read(out / "nlvr2_train.jsonl")[0]["conversations"][0]["images"] == [
        "train/train-5-1-img0.png", "train/train-5-1-img1.png"]
    skipped = read(out / "skipped.jsonl")
    assert [(s["line"], s["id"]) for s in skipped] == [(3, "dev-2-3-0"), (4, "dev-1-0-1")]
    assert "dev-2-3-img1.png" in skipped[0]["reason"] and "http://r/x.png" in skipped[0]["reason"]
    assert skipped[1]["reason"].startswith("duplicate id")


def test_nlvr2_cauldron_two_images_multi_turn(tmp_path):
    rows = [cauldron_row([png((1, 1, 1)), png((2, 2, 2))], [("Claim A?", "yes"), ("Claim B?", "no")]),
            cauldron_row([png((3, 3, 3))], [("One image?", "no")])]
    write_parquet(tmp_path / "train-00000.parquet", rows)
    out = tmp_path / "out"
    nlvr2.convert(tmp_path / "train-00000.parquet", out, val_rows=0)
    (rec,) = read(out / "nlvr2_train.jsonl")
    assert rec["conversations"] == [
        {"images": ["train/train-0000000000.0.png", "train/train-0000000000.1.png"], "user": "Claim A?", "assistant": "yes"},
        {"images": [], "user": "Claim B?", "assistant": "no"}]
    assert read(out / "skipped.jsonl")[0]["reason"] == "expected 2 image(s), found 1"


# ---------------------------------------------------------------- LLaVA / ShareGPT

def test_llava(tmp_path):
    for name in ("coco/a.jpg", "coco/b.jpg"):
        p = tmp_path / "imgs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4), (9, 9, 9)).save(p)
    items = [
        {"id": "a", "image": "coco/a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": 2, "image": ["coco/a.jpg", "coco/b.jpg"], "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Compare\n<image>\n<image>"}, {"from": "gpt", "value": "Same."}]},
        {"id": "noph", "image": "coco/b.jpg", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Grey."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"id": "mismatch", "image": "coco/a.jpg", "conversations": [
            {"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": "order", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "lost", "image": "coco/zzz.jpg", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "a", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "dup"}]},
    ]
    src = tmp_path / "mix.json"
    src.write_text(json.dumps(items, indent=1))
    out = tmp_path / "out"
    stats = llava.convert(src, out, image_folder=tmp_path / "imgs", source="mix")
    assert stats["records"] == {"mix.jsonl": 4} and stats["skipped"] == 4
    recs = read(out / "mix.jsonl")
    assert recs[0] == {"id": "a", "source": "mix", "conversations": [
        {"images": ["coco/a.jpg"], "user": "What is it?", "assistant": "A box."},
        {"images": [], "user": "Colour?", "assistant": "Grey."}]}
    assert recs[1]["id"] == "2" and [t["images"] for t in recs[1]["conversations"]] == [[], ["coco/a.jpg", "coco/b.jpg"]]
    assert recs[1]["conversations"][1]["user"] == "Compare"
    assert recs[2]["conversations"][0]["images"] == ["coco/b.jpg"]
    assert recs[3]["conversations"] == [{"images": [], "user": "2+2?", "assistant": "4"}]
    skipped = read(out / "skipped.jsonl")
    assert [(s["line"], s["id"]) for s in skipped] == [("item 4", "mismatch"), ("item 5", "order"),
                                                       ("item 6", "lost"), ("item 7", "a")]
    assert skipped[0]["reason"] == "2 <image> placeholder(s) but 1 image(s)"
    assert check.check(out / "mix.jsonl")["problems"] == []


def test_sharegpt(tmp_path):
    write_png(tmp_path / "pics" / "p.png", (7, 7, 7))
    data_url = "data:image/png;base64," + base64.b64encode(png((1, 2, 3))).decode()
    items = [
        {"id": "m1", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "image", "image": "pics/p.png"},
                                         {"type": "text", "text": "What differs?"}]},
            {"role": "assistant", "content": "Colour."},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]},
        {"messages": [{"role": "user", "content": "<image>Name it."}, {"role": "assistant", "content": "P."}],
         "images": ["pics/p.png"]},
        {"id": "web", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]},
            {"role": "assistant", "content": "?"}]},
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "out"
    stats = sharegpt.convert(src, out)
    assert stats["records"] == {"chat.jsonl": 2} and stats["skipped"] == 1
    r0, r1 = read(out / "chat.jsonl")
    data_rel = r0["conversations"][0]["images"][0]
    assert data_rel.startswith("chat/") and data_rel.endswith(".png")
    assert (out / "images" / data_rel).read_bytes() == png((1, 2, 3))
    assert r0 == {"id": "m1", "source": "sharegpt", "conversations": [
        {"images": [data_rel, "pics/p.png"], "user": "What differs?", "assistant": "Colour."},
        {"images": [], "user": "Sure?", "assistant": "Yes."}], "system": "Be brief."}
    assert r1 == {"id": "chat-00000001", "source": "sharegpt", "conversations": [
        {"images": ["pics/p.png"], "user": "Name it.", "assistant": "P."}]}
    (s,) = read(out / "skipped.jsonl")
    assert s["id"] == "web" and "offline" in s["reason"]
    with pytest.raises(ConvertError, match=r"chat\.jsonl:3: remote image URL"):
        sharegpt.convert(src, tmp_path / "strict", strict=True)


# ---------------------------------------------------------------- check

def test_check_reports_problems(tmp_path):
    write_png(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"nope")
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    turn = lambda imgs: {"images": imgs, "user": "q", "assistant": "a"}  # noqa: E731
    lines = [json.dumps({"id": "1", "source": "s", "conversations": [turn(["ok.png", "ok.png"])]}),
             json.dumps({"id": "2", "source": "s", "conversations": [turn(["bad.png"]), turn(["empty.png"])]}),
             json.dumps({"id": "1", "source": "s", "conversations": [turn(["gone.png"])]}),
             "{oops",
             json.dumps({"id": "4", "source": "s", "conversations": [{"images": [], "user": "q"}]})]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    s = check.check(f)
    assert (s["records"], s["turns"], s["images"], s["distinct_images"]) == (3, 4, 5, 4)
    probs = s["problems"]
    assert len(probs) == 6
    assert "d.jsonl:2: field 'conversations[0].images[0]'" in probs[0] and "does not open with PIL" in probs[0]
    assert "d.jsonl:2: field 'conversations[1].images[0]'" in probs[1] and "empty file" in probs[1]
    assert "d.jsonl:3: field 'id': duplicate '1' (first at line 1)" in probs[2]
    assert "d.jsonl:3:" in probs[3] and probs[3].endswith("missing")
    assert "d.jsonl:4: invalid JSON" in probs[4]
    assert "d.jsonl:5: field 'conversations[0].assistant': missing" in probs[5]
    r = subprocess.run([sys.executable, "-m", "convert.check", str(f)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "3 records, 4 turns, 5 images (4 distinct), 6 problems" in r.stdout
    good = tmp_path / "g.jsonl"
    good.write_text(lines[0] + "\n")
    r = subprocess.run([sys.executable, "-m", "convert.check", str(good), "--images_dir", str(tmp_path / "images")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "0 problems" in r.stdout


# ---------------------------------------------------------------- null text, stable reasons, stale outputs

def _docvqa_nulls(src: Path) -> None:
    write_png(src / "val" / "documents" / "d.png")
    qa = lambda i, q, a: {"questionId": i, "question": q, "image": "documents/d.png", "answers": a}  # noqa: E731
    (src / "val" / "val_v1.0.json").write_text(json.dumps({"data": [
        qa(1, "Title?", ["Report"]), qa(2, None, ["x"]), qa(3, "Date?", [None]), qa(4, "Page?", ["2", 2]),
        qa(None, "Who?", ["Bob"])]}))
    write_parquet(src / "train-00000-of-00001.parquet", [docvqa_row("q1", (1, 0, 0), None, ["a"])])


def _hateful_nulls(src: Path) -> None:
    write_png(src / "img" / "1.png")
    lines = [{"id": 1, "img": "img/1.png", "label": 1, "text": "hi"}, {"id": 2, "img": "img/1.png", "label": 0,
             "text": None}, {"id": 3, "img": "img/1.png", "label": 0, "text": 7}]
    (src / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_parquet(src / "c" / "train-00000-of-00001.parquet", [   # Cauldron: texts[j].user / .assistant
        cauldron_row([png()], [("Hateful?", "no")]), cauldron_row([png()], [(None, "no")]),
        cauldron_row([png()], [("Hateful?", "yes"), ("Sure?", None)])])


def _nlvr2_nulls(src: Path) -> None:
    for k in (0, 1):
        write_png(src / "dev" / f"dev-1-0-img{k}.png")
    lines = [{"identifier": "dev-1-0-0", "sentence": "Two dogs.", "label": "True"},
             {"identifier": "dev-1-0-1", "sentence": None, "label": "False"}]
    (src / "dev.json").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _chat_nulls(src: Path) -> None:
    def msgs(*parts):
        return [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "ok"}]
    items = [{"id": "good", "messages": msgs({"type": "text", "text": "hi"})},
             {"id": "null", "messages": msgs({"type": "text", "text": "a"}, {"type": "text", "text": None})},
             {"id": "number", "messages": msgs({"type": "text", "text": 5})},
             {"id": "content", "messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}]
    src.mkdir()
    (src / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))


NULL_CASES = {   # converter, input writer, src (relative to the folder written), fields named in skip reasons
    "docvqa": (docvqa, _docvqa_nulls, ".", ["'query.en'", "'question'", "'answers[0]'", "'answers[1]'",
                                            "'questionId'"]),
    "hateful_memes": (hateful_memes, _hateful_nulls, ".", ["'text'", "'text'", "'texts[0].user'",
                                                           "'texts[1].assistant'"]),
    "nlvr2": (nlvr2, _nlvr2_nulls, ".", ["'sentence'"]),
    "sharegpt": (sharegpt, _chat_nulls, "chat.jsonl", ["'messages[0].content[1].text'",
                                                       "'messages[0].content[0].text'", "'messages[0].content'"]),
}


@pytest.mark.parametrize("name", NULL_CASES)
def test_null_or_number_text_is_skipped_naming_the_field(name, tmp_path):
    """A JSON null (or a number) in a text field never becomes training text ("None"): the item is
    skipped with the field named, or --strict stops on it."""
    module, write, src, fields = NULL_CASES[name]
    write(tmp_path / "raw")
    kw = {"val_rows": 0} if name == "hateful_memes" else {}
    stats = module.convert(tmp_path / "raw" / src, tmp_path / "out", **kw)
    reasons = [s["reason"] for s in read(tmp_path / "out" / "skipped.jsonl")]
    assert len(reasons) == len(fields) and all(f in r for f, r in zip(fields, reasons)), reasons
    assert sum(stats["records"].values()) >= 1
    for f in (tmp_path / "out").glob("*.jsonl"):
        if f.name != "skipped.jsonl":
            assert "None" not in f.read_text() and '"7"' not in f.read_text(), f.name
    with pytest.raises(ConvertError, match="field '"):
        module.convert(tmp_path / "raw" / src, tmp_path / "strict", strict=True, **kw)


def test_skip_reasons_are_the_same_on_every_run(tmp_path):
    """Corrupt images (not an image at all, a cut JPEG, embedded garbage bytes): the reasons hold no
    object repr with a memory address, so two runs (two processes) write the same skipped.jsonl."""
    imgs = tmp_path / "imgs"
    write_png(imgs / "ok.png")
    (imgs / "junk.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 80, 200)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    (imgs / "cut.jpg").write_bytes(jpg[:jpg.index(b"\xff\xda") + 30])
    turn = lambda img: [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]  # noqa: E731
    items = [{"id": n, "image": n, "conversations": turn(n)} for n in ("ok.png", "junk.png", "cut.jpg")]
    (tmp_path / "mix.json").write_text(json.dumps(items))
    llava.convert(tmp_path / "mix.json", tmp_path / "a", image_folder=imgs)
    r = subprocess.run([sys.executable, "-m", "convert.llava", "--src", str(tmp_path / "mix.json"), "--out_dir",
                        str(tmp_path / "b"), "--image_folder", str(imgs), "--no_progress"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = (tmp_path / d / "skipped.jsonl" for d in "ab")
    assert len(read(a)) == 2 and a.read_bytes() == b.read_bytes()
    assert "0x" not in a.read_text() and "object" not in a.read_text(), a.read_text()
    # embedded bytes (Cauldron) that PIL identifies but cannot decode
    write_parquet(tmp_path / "c" / "train-0.parquet", [cauldron_row([jpg[:jpg.index(b"\xff\xda") + 30]], [("q", "a")])])
    for d in ("c1", "c2"):
        hateful_memes.convert(tmp_path / "c", tmp_path / d, val_rows=0)
    assert (tmp_path / "c1" / "skipped.jsonl").read_bytes() == (tmp_path / "c2" / "skipped.jsonl").read_bytes()
    assert "0x" not in (tmp_path / "c1" / "skipped.jsonl").read_text()


STALE_CASES = {   # converter, input writer, kwargs, the splits its input gives, every split it can write
    "docvqa": (docvqa, _docvqa_nulls, {}, {"val"}, {"train", "val", "test"}),
    "hateful_memes": (hateful_memes, _hateful_nulls, {"val_rows": 1}, {"train", "val"},
                      {"train", "val", "test", "val_unseen", "test_unseen"}),
    "nlvr2": (nlvr2, _nlvr2_nulls, {}, {"val"}, {"train", "val", "test", "test2"}),
    "ucf101": (ucf101, None, {"num_frames": 2, "classes": ["Archery"]}, {"train", "val", "test"},
               {"train", "val", "test"}),
}


@pytest.mark.parametrize("name", STALE_CASES)
def test_stale_split_files_of_an_earlier_conversion_are_removed(name, tmp_path, ucf_src):
    """Converting into a folder that holds split files of an earlier conversion: this converter's own
    files that the new input does not produce are removed and listed; other files stay."""
    module, write, kw, produced, possible = STALE_CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    earlier = [f"{name}_{s}.jsonl" for s in ("train", "val", "test", "test2", "val_unseen", "test_unseen")]
    others = ["notes.jsonl", f"{name}_train_small.jsonl", "nlvr2_x.jsonl", "skipped.jsonl"]
    for f in earlier + others:
        (out / f).write_text('{"stale": true}\n')
    if write is not None:
        write(tmp_path / "raw")
    stats = module.convert(ucf_src if write is None else tmp_path / "raw", out, **kw)
    assert set(stats["records"]) == {f"{name}_{s}.jsonl" for s in produced}
    assert stats["removed"] == sorted(f"{name}_{s}.jsonl" for s in possible - produced)
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(set(earlier + others) - set(stats["removed"]))
    assert all(read(out / f) != [{"stale": True}] for f in list(stats["records"]) + ["skipped.jsonl"])


def test_stale_outputs_are_named_on_the_command_line(tmp_path):
    """The removal is said on stderr; a skipped.jsonl of an earlier run is emptied when nothing is skipped."""
    src = tmp_path / "raw"
    _nlvr2_nulls(src)
    (src / "dev.json").write_text((src / "dev.json").read_text().splitlines()[0] + "\n")   # the good line only
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "nlvr2_test.jsonl").write_text("{}\n")
    (tmp_path / "out" / "skipped.jsonl").write_text('{"reason": "from an earlier run"}\n')
    r = subprocess.run([sys.executable, "-m", "convert.nlvr2", "--src", str(src), "--out_dir", str(tmp_path / "out"),
                        "--no_progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] == ["nlvr2_test.jsonl"], r.stderr
    assert f"removed nlvr2_test.jsonl from {tmp_path / 'out'}" in r.stderr
    assert (tmp_path / "out" / "skipped.jsonl").read_text() == "" and (tmp_path / "out" / "nlvr2_val.jsonl").exists()
