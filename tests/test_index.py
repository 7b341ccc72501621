"""The dataset index (phi3v.index): exact cached token counts, cache invalidation and integrity, one
build per node under torchrun, duplicate ids, lean records, the O(batch) sampler."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers import ENV, REPO, free_port
from phi3v import Processor
from phi3v.data import JsonlDataset, StepBatchSampler, StepSampler
from phi3v.index import cache_name

SIZES = {"wide.png": (900, 300), "tall.png": (250, 800), "square.png": (400, 400), "tiny.png": (40, 30),
         "big.png": (1500, 1100)}


@pytest.fixture(scope="module")
def proc4(demo_dir):
    """The demo tokenizer at num_crops 4: images of different sizes get different token counts."""
    return Processor.from_pretrained(demo_dir / "model", num_crops=4)


def turn(images, user="What is shown?", assistant="A thing."):
    return {"images": images, "user": user, "assistant": assistant}


def write_data(root, records=None):
    """images/ with SIZES + x.jsonl holding `records` (default: a mixed set)."""
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    for name, size in SIZES.items():
        Image.new("RGB", size, (len(name) * 20, 90, 160)).save(root / "images" / "sub" / name)
    if records is None:
        names = [f"sub/{n}" for n in SIZES]
        records = [{"id": f"r{i}", "source": "t", "conversations": [turn([names[i % len(names)]])]} for i in range(6)]
        records += [
            {"id": "multi", "source": "t", "conversations": [turn(names[:3], "Compare the three images.")]},
            {"id": "turns", "source": "t", "conversations": [
                turn([names[0]], "First?", "One."), turn([], "And without an image? <|end|> ünïcode ✓", "Two."),
                turn(names[3:], "Last two.", "Three.")]},
            {"id": "text", "source": "t", "conversations": [turn([], "No image at all.", "Fine.")]},
        ]
    path = root / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cached_lengths_are_exact(proc4, tmp_path):
    path = write_data(tmp_path)
    cold = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache")
    warm = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache")
    assert (cold.index_source, warm.index_source) == ("built", "cache")
    assert len(set(cold.lengths.tolist())) > 4, "the sizes give different counts"
    assert np.array_equal(cold.lengths, warm.lengths) and len(warm) == 9
    for i in range(len(warm)):
        assert warm.lengths[i] == len(warm[i]["input_ids"]), warm.record(i)[1]["id"]


def test_changes_are_detected_and_rebuilt(proc4, demo_dir, tmp_path):
    path = write_data(tmp_path)
    cache = tmp_path / "cache"

    def load(p=proc4, **kw):
        return JsonlDataset(path, p, cache_dir=cache, **kw)
    first = load()
    assert load().index_source == "cache"
    # the same size and mtime, other content: the content hash sees it
    st = path.stat()
    text = path.read_text()
    path.write_text(text.replace("Compare the three", "Compare all three"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and load().index_source == "built"
    # a record more
    with open(path, "a") as f:
        f.write(json.dumps({"id": "new", "source": "t", "conversations": [turn([], "q", "a")]}) + "\n")
    ds = load()
    assert ds.index_source == "built" and len(ds) == len(first) + 1
    assert load().index_source == "cache"
    # an image replaced in place by one of another size: its token count changes
    img = tmp_path / "images" / "sub" / "square.png"
    Image.new("RGB", (1200, 300), "white").save(img)
    ds = load()
    assert ds.index_source == "built" and not np.array_equal(ds.lengths[:-1], first.lengths)
    assert all(ds.lengths[i] == len(ds[i]["input_ids"]) for i in range(len(ds)))
    # other processor settings: another cache entry
    assert load(Processor.from_pretrained(demo_dir / "model", num_crops=2)).index_source == "built"
    # max_length is applied to the cached counts: no rebuild
    ds = load(max_length=int(np.median(first.lengths)))
    assert ds.index_source == "cache" and ds.n_dropped > 0


def test_an_image_that_appears_is_seen(proc4, tmp_path):
    path = write_data(tmp_path, [{"id": "a", "source": "t", "conversations": [turn(["late.png"])]},
                                 {"id": "b", "source": "t", "conversations": [turn(["sub/wide.png"])]}])
    ds = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache", on_bad_record="skip")
    assert len(ds) == 1 and "late.png" in ds.skipped[0] and f"{path}:1" in ds.skipped[0]
    Image.new("RGB", (500, 200), "red").save(tmp_path / "images" / "late.png")
    ds = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache", on_bad_record="skip")
    assert ds.index_source == "built" and len(ds) == 2 and not ds.skipped


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_damaged_cache_is_never_trusted(proc4, tmp_path, damage):
    path = write_data(tmp_path)
    cache = tmp_path / "cache"
    good = JsonlDataset(path, proc4, cache_dir=cache)
    (f,) = cache.iterdir()
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:len(data) // 2])
    elif damage == "flip":      # a count in the arrays, the file's size unchanged
        i = len(data) - 8
        f.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
    elif damage == "garbage":
        f.write_bytes(os.urandom(len(data)))
    else:
        f.write_bytes(b"")
    ds = JsonlDataset(path, proc4, cache_dir=cache)
    assert ds.index_source == "built" and np.array_equal(ds.lengths, good.lengths)
    assert JsonlDataset(path, proc4, cache_dir=cache).index_source == "cache"      # and written again


def test_cache_writes_are_atomic_and_optional(proc4, tmp_path, monkeypatch):
    path = write_data(tmp_path)
    cache = tmp_path / "cache"
    real = type(path).write_bytes

    def half_then_die(self, data):
        real(self, data[:len(data) // 2])
        raise KeyboardInterrupt          # a kill in the middle of the write
    monkeypatch.setattr(type(path), "write_bytes", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        JsonlDataset(path, proc4, cache_dir=cache)
    monkeypatch.undo()
    assert list(cache.iterdir()) == [], "nothing half-written is left, not even a temporary file"
    # no cache at all
    for _ in range(2):
        assert JsonlDataset(path, proc4, cache_dir=False).index_source == "built"
    assert list(cache.iterdir()) == []
    # an unusable cache folder: the data is indexed anyway, and the dataset says why nothing was cached
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    ds = JsonlDataset(path, proc4, cache_dir=blocked)
    assert ds.index_source == "built" and "index cache not written" in ds.cache_note


def test_default_cache_folder_from_the_environment(proc4, tmp_path, monkeypatch):
    path = write_data(tmp_path)
    monkeypatch.setenv("PHI3V_CACHE", str(tmp_path / "env_cache"))
    JsonlDataset(path, proc4)
    assert [f.name for f in (tmp_path / "env_cache").iterdir()] == [cache_name(path, path.parent / "images", proc4)]


def test_duplicate_ids_name_both_lines(proc4, tmp_path):
    rec = {"id": "same", "source": "t", "conversations": [turn(["sub/wide.png"])]}
    other = {"id": "other", "source": "t", "conversations": [turn([])]}
    path = write_data(tmp_path, [rec, other, rec])
    with pytest.raises(ValueError, match=rf"x.jsonl:3: duplicate id 'same', first at .*x.jsonl:1$"):
        JsonlDataset(path, proc4, cache_dir=tmp_path / "cache")
    ds = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache", on_bad_record="skip")
    assert [ds.record(i)[1]["id"] for i in range(len(ds))] == ["same", "other"]
    assert len(ds.skipped) == 1 and "x.jsonl:3: duplicate id 'same'" in ds.skipped[0]


def test_no_python_object_per_record(proc4, tmp_path):
    """The dataset keeps arrays, not records: building one of 3000 records leaves a few objects."""
    names = [f"sub/{n}" for n in SIZES]
    path = write_data(tmp_path, [{"id": f"r{i}", "source": "t", "conversations": [turn([names[i % 5]], f"q {i}")]}
                                 for i in range(3000)])
    JsonlDataset(path, proc4, cache_dir=tmp_path / "cache")        # cached, so both paths are counted below
    for _ in range(2):
        gc.collect()
        before = len(gc.get_objects())
        ds = JsonlDataset(path, proc4, cache_dir=tmp_path / "cache" if _ else False)
        gc.collect()
        assert len(ds) == 3000 and len(gc.get_objects()) - before < 100


def test_two_ranks_index_once(proc4, demo_dir, tmp_path):
    """torchrun: local rank 0 builds, rank 1 loads the file it wrote (never tokenizes); a data error is
    the same one-line error on both ranks."""
    path = write_data(tmp_path)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import torch.distributed as td
        sys.path.insert(0, {str(REPO)!r})
        from phi3v import Processor
        from phi3v.data import JsonlDataset
        td.init_process_group("gloo")
        proc = Processor.from_pretrained({str(demo_dir / "model")!r}, num_crops=4)
        try:
            ds = JsonlDataset(sys.argv[1], proc, cache_dir=sys.argv[2])
            out = {{"source": ds.index_source, "lengths": ds.lengths.tolist()}}
        except ValueError as e:
            out = {{"error": str(e)}}
        print("RESULT", td.get_rank(), json.dumps(out), flush=True)
        td.destroy_process_group()
    """))

    def run(data):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(data),
                            str(tmp_path / "cache")], env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return dict(sorted((int(r), json.loads(o)) for _, r, o in
                           (line.split(" ", 2) for line in p.stdout.splitlines() if line.startswith("RESULT"))))
    out = run(path)
    assert out[0]["source"] == "built" and out[1]["source"] == "cache"
    assert out[0]["lengths"] == out[1]["lengths"] == JsonlDataset(path, proc4, cache_dir=False).lengths.tolist()
    bad = write_data(tmp_path / "bad", [{"id": "a", "source": "t", "conversations": [turn(["missing.png"])]}])
    out = run(bad)
    assert out[0] == out[1] and "missing.png" in out[0]["error"] and f"{bad}:1" in out[0]["error"]


def test_sampler_length_is_arithmetic_and_exact():
    for n in (1, 5, 23, 64):
        for batch, micro in ((1, 1), (4, 2), (6, 3), (8, 1), (64, 4)):
            for world in (1, 2, 3):
                for rank in range(world):
                    s = StepSampler([(i * 7) % 13 for i in range(n)], batch, micro, rank, world, seed=1)
                    for a, b in ((0, 10), (3, 17), (5, 5)):
                        assert len(StepBatchSampler(s, a, b)) == sum(1 for _ in s.batches(a, b))


def test_sampler_permutes_once_per_epoch():
    s = StepSampler(np.arange(1000), batch_size=10, micro_batch_size=2, seed=5)
    s.micro_batches(0)
    order = s._order
    for step in range(1, 100):                        # the rest of epoch 0
        s.micro_batches(step)
        assert s._order is order
    s.micro_batches(100)
    assert s._order is not order and sorted(s._order.tolist()) == list(range(1000))
