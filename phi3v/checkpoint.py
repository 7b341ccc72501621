"""Resumable training checkpoints in `<output_dir>/checkpoints/step-N/`.

A checkpoint only ever appears whole: every rank writes into `.tmp-step-N/`, rank 0 then writes
a `COMPLETE` marker listing each file with its size and CRC-32 and renames the directory to
`step-N` (files and directories fsynced). A crash at any moment leaves earlier checkpoints
untouched; the leftover temporary directory is removed by the next save. All ranks must see the
same `output_dir` (one node, or a shared filesystem).

A checkpoint with a missing or truncated file is not complete (`latest_checkpoint` skips it). A
file damaged in place keeps its size; `verify_checkpoint` finds it by its checksum. Checksums are
computed once per save, each rank reading back the files it wrote (from the page cache, 8 MiB at
a time: zlib's CRC-32 runs at several GB/s), and checked when a checkpoint is loaded.

Layout of step-N/:
    weights.safetensors   trainable weights (rank 0)
    optim_rank{r}.pt      each rank's optimizer state
    rank{r}.pt            each rank's own state, e.g. its RNG states (optional)
    meta.json             `meta` (step, config, history, ...; plain JSON)
    COMPLETE              {"step": N, "files": {name: size}, "crc32": {name: CRC-32}}, written last
"""
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import dist

WEIGHTS, COMPLETE, META_JSON = "weights.safetensors", "COMPLETE", "meta.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 8 MiB blocks."""
    crc, buf = 0, bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _owner(name: str, world: int) -> int:
    """The rank that checksums (at save) and verifies (at load) a checkpoint file: the rank in its
    name (`optim_rank3.pt`, `rank3.pt`), else rank 0, so every rank reads about its own share."""
    m = re.search(r"rank(\d+)\.", name)
    return int(m.group(1)) % world if m else 0


def _torch_save(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _json_exact(value) -> bool:
    """True if `value` survives a JSON round trip unchanged (no tuples, int keys, nan, tensors)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _is_complete(path: Path) -> bool:
    """COMPLETE exists and every file it lists has the recorded size."""
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and _is_complete(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


def _remove(path: Path, root: Path) -> None:
    """Delete a directory, first renaming it out of sight so a half-deleted one never looks valid."""
    trash = root / f".trash-{path.name}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    _fsync(root)
    shutil.rmtree(trash)


def save_checkpoint(output_dir, step: int, tensors: dict[str, torch.Tensor], optim_state: dict,
                    meta: dict, keep_last: int | None = None, rank_state: dict | None = None) -> Path:
    """Write `checkpoints/step-{step}/` atomically; collective, every rank calls it.

    `tensors` (trainable weights) and `meta` (shared state that survives a JSON round trip; `step`
    is added) are taken from rank 0. Every rank writes its own
    `optim_state` and, if given, `rank_state` (its RNG states). Afterwards only the newest
    `keep_last` complete checkpoints are kept (all if None). Returns the final directory.
    """
    bad = [k for k, v in meta.items() if not _json_exact(v)]
    if bad:
        raise ValueError(f"save_checkpoint: meta entries {bad} do not survive JSON (use lists, str keys)")
    root = Path(output_dir) / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    rank = dist.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of crashed saves; no other save can be running now.
        for d in root.iterdir():
            if d.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(d)
        tmp.mkdir()
    dist.barrier()

    _torch_save(optim_state, tmp / f"optim_rank{rank}.pt")
    if rank_state is not None:
        _torch_save(rank_state, tmp / f"rank{rank}.pt")
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        _fsync(tmp / WEIGHTS)
        (tmp / META_JSON).write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync(tmp / META_JSON)
    dist.barrier()  # every rank's files are on disk
    # each rank checksums the files it wrote; rank 0 records them all in COMPLETE
    world = dist.world_size()
    sums = dist.all_gather_object({p.name: file_crc32(p) for p in sorted(tmp.iterdir())
                                   if _owner(p.name, world) == rank})

    if rank == 0:
        listing = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        crc = {name: c for part in sums for name, c in part.items()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": listing, "crc32": crc}, indent=1))
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if final.exists():  # saving the same step again (e.g. right after a resume)
            _remove(final, root)
        os.replace(tmp, final)
        _fsync(root)
        if keep_last is not None and keep_last > 0:
            for _, old in _complete_steps(root)[:-keep_last]:
                _remove(old, root)
    dist.barrier()
    return final


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete `checkpoints/step-N/` under `output_dir`, or None."""
    found = _complete_steps(Path(output_dir) / "checkpoints")
    return found[-1][1] if found else None


def complete_checkpoints(output_dir) -> list[Path]:
    """Every complete `checkpoints/step-N/` under `output_dir`, newest first."""
    return [d for _, d in reversed(_complete_steps(Path(output_dir) / "checkpoints"))]


def _check_files(path: Path, names=None, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of the listed files of a checkpoint (all, or `names`) that `rank` owns: missing,
    wrong size, wrong checksum. A checkpoint saved before checksums existed is checked by size."""
    if not path.is_dir():
        return [f"{path} does not exist (a checkpoints/step-N directory)"] if rank == 0 else []
    try:
        listing = json.loads((path / COMPLETE).read_text())
        files, crc = listing["files"], listing.get("crc32", {})
        if not isinstance(files, dict) or not isinstance(crc, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{path} is not a complete checkpoint (missing or unreadable {COMPLETE})"] if rank == 0 else []
    problems = []
    for name, size in sorted(files.items()):
        if (names is not None and name not in names) or _owner(name, world) != rank:
            continue
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {COMPLETE} recorded {size}")
        elif name in crc and file_crc32(f) != crc[name]:
            problems.append(f"{f} is damaged (its CRC-32 differs from the one recorded at save)")
    return problems


def verify_checkpoint(path) -> str | None:
    """None if every file of the checkpoint has its recorded size and checksum, else what is wrong
    (the first problem found). Collective under a process group: each rank reads its share of the
    files, and every rank returns the same answer."""
    problems = dist.all_gather_object(_check_files(Path(path), rank=dist.rank(), world=dist.world_size()))
    found = sorted(p for part in problems for p in part)
    return found[0] if found else None


def load_checkpoint(path, weights: bool = True, verify: bool = True
                    ) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Read a checkpoint directory: (trainable weights, optimizer states of all ranks in rank
    order, meta). `meta` is meta.json plus `rank_states`, the list of the
    ranks' `rank_state`s (empty if none were saved). Optimizer states are memory-mapped.
    `weights=False` skips reading the weights file (returns {}): a resume restores the parameters
    from the optimizer's fp32 masters, and for full fine-tuning that file is the whole model.
    `verify` checks the checksums of the files read first (a caller that ran `verify_checkpoint`
    skips it); a damaged or unreadable file is a ValueError naming it.
    """
    path = Path(path)
    if not _is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (missing COMPLETE or a file)")
    names = [p.name for p in path.iterdir()]

    def ranked(prefix: str) -> list[Path]:
        found = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(prefix + r"(\d+)\.pt", n)))
        if found != list(range(len(found))):
            raise ValueError(f"{path}: {prefix}*.pt files are not ranks 0..n-1: {found}")
        return [path / f"{prefix}{r}.pt" for r in found]

    optim_files, rank_files = ranked("optim_rank"), ranked("rank")
    if verify:
        read = {p.name for p in optim_files + rank_files} | {META_JSON} | ({WEIGHTS} if weights else set())
        problems = _check_files(path, read)
        if problems:
            raise ValueError(problems[0])

    def load(p: Path, what, **kw):
        try:
            return what(p, **kw)
        except Exception as e:  # torch/safetensors/json raise their own types for damaged files
            raise ValueError(f"{p}: cannot read checkpoint file ({type(e).__name__}: {e})") from None

    tensors = load(path / WEIGHTS, load_file) if weights else {}
    optim_states = [load(p, torch.load, map_location="cpu", mmap=True, weights_only=True) for p in optim_files]
    meta = load(path / META_JSON, lambda p: json.loads(p.read_text()))
    meta["rank_states"] = [load(p, torch.load, map_location="cpu", weights_only=False) for p in rank_files]
    return tensors, optim_states, meta


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, Python, numpy): a `rank_state` that lets a resumed run
    draw the same dropout masks as an uninterrupted one."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
