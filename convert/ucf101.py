"""UCF-101 videos -> 8 evenly spaced JPEG frames per clip + ucf101_{train,val,test}.jsonl (RECIPE §7).

    python -m convert.ucf101 --src UCF101_subset --out_dir OUT [--num_frames 8] [--classes A,B] [--workers 4]

`--src` holds train/ val/ test/, each with <Class>/*.avi, or is a folder whose only child is
UCF101_subset/, or is the recipe's download UCF101_subset.tar.gz (or a hub snapshot folder holding
just that archive), which is extracted to a temporary folder. Differences from the recipe script:
videos are taken in sorted order rather than glob order, a video that cannot be read or has fewer
frames than asked for is skipped (OUT/skipped.jsonl) and its id is left unused so the others keep
theirs, and with a num_frames whose float stride yields one index too many only the first
num_frames indices are kept.
Needs PyAV (`pip install phi3v[video]`).
"""
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from phi3v.cli import positive_int
from phi3v.schema import make_record, make_turn

from .common import ConvertError, Output, cli, parallel_map

SPLITS = ("train", "val", "test")


def prompt(classes: list) -> str:
    """The recipe's single classification prompt."""
    return "Classify the video into one of the following classes: " + ", ".join(classes) + "."


def find_root(src: Path) -> Path:
    """The folder holding train/ val/ test/ (src itself, or its only child such as UCF101_subset/)."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    if any((src / s).is_dir() for s in SPLITS):
        return src
    children = [c for c in src.iterdir() if c.is_dir()]
    if len(children) == 1 and any((children[0] / s).is_dir() for s in SPLITS):
        return children[0]
    raise ConvertError(f"{src}: expected train/ val/ test/ folders (or a single UCF101_subset/ child)")


def find_archive(src: Path) -> Path | None:
    """The recipe's download, UCF101_subset.tar.gz: `src` itself, or the only .tar.gz in a hub snapshot folder."""
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
        return src
    if src.is_dir() and not any((src / s).is_dir() for s in SPLITS):
        tars = sorted(p for p in src.iterdir() if p.name.endswith((".tar.gz", ".tgz")) and p.is_file())
        if len(tars) == 1 and not [c for c in src.iterdir() if c.is_dir() and not c.name.startswith(".")]:
            return tars[0]
    return None


def frame_indices(total: int, num_frames: int) -> list:
    """The recipe's `np.arange(0, total, total/num_frames).astype(int)`, at most num_frames long."""
    return [int(i) for i in np.arange(0, total, total / num_frames).astype(int)][:num_frames]


def extract(job) -> tuple:
    """Decode one video and save its frames; returns ('ok', n_frames) or ('skip', reason).

    Frames are written only when all wanted frames decoded, so a skipped video leaves no files.
    """
    video, out_paths, num_frames = job
    import av

    try:
        with av.open(str(video)) as c:
            if not c.streams.video:
                return "skip", "no video stream"
            total = c.streams.video[0].frames
        if total <= 0:  # no frame count in the metadata: count decoded frames
            with av.open(str(video)) as c:
                total = sum(1 for _ in c.decode(video=0))
        if total < num_frames:
            return "skip", f"has {total} frames, fewer than num_frames={num_frames}"
        wanted = frame_indices(total, num_frames)
        pos = {idx: k for k, idx in enumerate(wanted)}
        frames = [None] * len(wanted)
        with av.open(str(video)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i in pos:
                    frames[pos[i]] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    except Exception as e:  # av raises its own error types for corrupt input
        msg = getattr(e, "strerror", None) or str(e)  # strerror: without the (absolute) file name
        return "skip", f"unreadable video: {type(e).__name__}: {msg}"
    missing = [wanted[k] for k, f in enumerate(frames) if f is None]
    if missing:
        return "skip", f"metadata says {total} frames but frame {missing[0]} could not be decoded"
    for arr, path in zip(frames, out_paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).convert("RGB").save(path, format="JPEG")  # PIL default quality (75)
    return "ok", len(frames)


def convert(src, out_dir, num_frames: int = 8, classes: list | None = None, strict: bool = False,
            workers: int = 1, progress: bool = False) -> dict:
    """Convert a UCF-101 split tree; returns stats {"records": {file: n}, "images", "skipped", ...}."""
    archive = find_archive(Path(src))
    if archive is not None:  # extract to a temporary folder, convert, clean up
        with tempfile.TemporaryDirectory(prefix="ucf101_") as tmp:
            try:
                with tarfile.open(archive) as tar:
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
                    tar.extractall(tmp, **safe)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:   # OSError: e.g. BadGzipFile
                raise ConvertError(f"{archive}: cannot extract the archive (corrupt or truncated?): "
                                   f"{type(e).__name__}: {e}") from None
            return convert(tmp, out_dir, num_frames, classes, strict, workers, progress)
    root = find_root(Path(src))
    out_dir = Path(out_dir)
    if num_frames < 1:
        raise ConvertError(f"num_frames must be >= 1, got {num_frames}")
    found = sorted({d.name for s in SPLITS if (root / s).is_dir() for d in (root / s).iterdir() if d.is_dir()})
    if classes is None:
        classes = found
    twice = sorted({c for c in classes if list(classes).count(c) > 1})
    if twice:
        raise ConvertError(f"classes name {twice} more than once")
    missing = [c for c in classes if c not in found]
    if missing:
        raise ConvertError(f"{root}: no folder for class(es) {missing}; found {found}")
    if not classes:
        raise ConvertError(f"{root}: no class folders found" if not found else "classes is empty")
    text = prompt(classes)

    # One global counter over all listed videos: train, then val, then test, each sorted.
    videos = []
    for split in SPLITS:
        for cls in sorted(classes):
            d = root / split / cls
            if d.is_dir():
                for v in sorted(p for p in d.iterdir() if p.suffix.lower() == ".avi" and p.is_file()):
                    videos.append((split, cls, v))

    out = Output(out_dir, strict=strict, outputs=[f"ucf101_{s}" for s in SPLITS])
    jobs, rels = [], []
    for split, cls, v in videos:
        rel = [f"{split}/{cls}/{v.stem}.{k}.jpg" for k in range(num_frames)]
        rels.append(rel)
        jobs.append((v, [out_dir / "images" / r for r in rel], num_frames))
    results = parallel_map(extract, jobs, workers, progress, "videos")

    for i, ((split, cls, v), rel, (status, info)) in enumerate(zip(videos, rels, results)):
        rid = f"{split}-{i:010d}"
        where = v.relative_to(root).as_posix()
        if status != "ok":
            out.skip(where, None, rid, info)
            continue
        rec = make_record(rid, "ucf101", [make_turn(rel, text, cls)])
        out.add(f"ucf101_{split}", rec, where, None)
    for split in SPLITS:  # a split folder that exists always gets its file, even if empty
        if (root / split).is_dir():
            out.lines.setdefault(f"ucf101_{split}", [])
    stats = out.finish()
    stats["images"] = sum(n for n in stats["records"].values()) * num_frames
    stats["classes"] = list(classes)
    return stats


def _classes(text: str) -> list:
    """--classes A,B: the names, each once (an empty list or a repeated name is an argument error)."""
    import argparse

    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, each once, got {text!r}")
    return names


if __name__ == "__main__":
    cli(convert, __doc__, (["--num_frames"], dict(type=positive_int, default=8, help="frames per video (default 8)")),
        (["--classes"], dict(type=_classes, default=None,
                             help="comma-separated class names, in prompt order (default: sorted folder names)")),
        workers=True)
