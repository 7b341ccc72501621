"""Resumable training checkpoints in `<output_dir>/checkpoints/step-N/`.

A checkpoint only ever appears whole: every rank writes into `.tmp-step-N/`, rank 0 then writes
a `COMPLETE` marker listing each file and its size and renames the directory to `step-N`
(files and directories fsynced). A crash at any moment leaves earlier checkpoints untouched;
the leftover temporary directory is removed by the next save. All ranks must see the same
`output_dir` (one node, or a shared filesystem).

Layout of step-N/:
    weights.safetensors   trainable weights (rank 0)
    optim_rank{r}.pt      each rank's optimizer state
    rank{r}.pt            each rank's own state, e.g. its RNG states (optional)
    meta.json             `meta` (step, config, history, ...; plain JSON)
    COMPLETE              {"step": N, "files": {name: size}}, written last
"""
import json
import os
import random
import re
import shutil
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

    if rank == 0:
        listing = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": listing}, indent=1))
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


def load_checkpoint(path, weights: bool = True) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Read a checkpoint directory: (trainable weights, optimizer states of all ranks in rank
    order, meta). `meta` is meta.json plus `rank_states`, the list of the
    ranks' `rank_state`s (empty if none were saved). Optimizer states are memory-mapped.
    `weights=False` skips reading the weights file (returns {}): a resume restores the parameters
    from the optimizer's fp32 masters, and for full fine-tuning that file is the whole model.
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

    tensors = load_file(path / WEIGHTS) if weights else {}
    optim_states = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                    for p in ranked("optim_rank")]
    meta = json.loads((path / META_JSON).read_text())
    meta["rank_states"] = [torch.load(p, map_location="cpu", weights_only=False)
                           for p in ranked("rank")]
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
