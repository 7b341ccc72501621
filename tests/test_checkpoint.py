"""Checkpoint files: round trip, keep-last pruning, incomplete dirs ignored, SIGKILL mid-save,
and a 2-rank (gloo) save that re-partitions onto one rank."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from phi3v.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from phi3v.optim import ZeroAdamW

REPO = Path(__file__).resolve().parents[1]


def _save(out, step, keep_last=None, value=None):
    value = float(step) if value is None else value
    return save_checkpoint(out, step, {"w": torch.full((4,), value)}, {"step": step},
                           {"note": f"step {step}"}, keep_last=keep_last)


def test_round_trip(tmp_path):
    tensors = {"a.lora_A.weight": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.bfloat16)}
    optim = {"step": 7, "master": torch.randn(10)}
    meta = {"config": {"lr": 2e-4, "name": "x", "targets": ["qkv_proj"]},
            "sampler": {"epoch": 1, "index": 12}}
    rank_state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    path = save_checkpoint(tmp_path, 7, tensors, optim, meta, rank_state=rank_state)
    assert path == tmp_path / "checkpoints" / "step-7"
    assert latest_checkpoint(tmp_path) == path
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())

    t, optims, m = load_checkpoint(path)
    assert t.keys() == tensors.keys() and all(torch.equal(t[k], tensors[k]) for k in t)
    t_skip, optims_skip, m_skip = load_checkpoint(path, weights=False)   # resume path: no weights read
    assert t_skip == {} and m_skip["step"] == 7 and torch.equal(optims_skip[0]["master"], optim["master"])
    assert len(optims) == 1 and optims[0]["step"] == 7 and torch.equal(optims[0]["master"], optim["master"])
    assert m["step"] == 7 and m["config"] == meta["config"] and m["sampler"] == meta["sampler"]
    assert m["rank_states"][0]["python"] == rank_state["python"]
    assert torch.equal(m["rank_states"][0]["torch"], rank_state["torch"])
    assert all(np.array_equal(a, b) for a, b in zip(m["rank_states"][0]["numpy"], rank_state["numpy"]))
    assert json.loads((path / "meta.json").read_text())["sampler"] == {"epoch": 1, "index": 12}
    listed = json.loads((path / "COMPLETE").read_text())["files"]
    assert set(listed) == {p.name for p in path.iterdir()} - {"COMPLETE"}


def test_meta_must_be_plain_json(tmp_path):
    with pytest.raises(ValueError, match=r"\['shape'\]"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1}, {"shape": (2, 3)})   # a tuple
    assert latest_checkpoint(tmp_path) is None


def test_keep_last_and_resave(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    _save(tmp_path, 5, keep_last=2, value=-1.0)  # same step again replaces it
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    assert load_checkpoint(root / "step-5")[0]["w"][0] == -1.0


def test_incomplete_dirs_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    (root / "step-9").mkdir()  # no COMPLETE
    (root / ".tmp-step-10").mkdir()
    truncated = _save(tmp_path, 4)
    with open(truncated / "weights.safetensors", "r+b") as f:  # size no longer matches COMPLETE
        f.truncate(10)
    assert latest_checkpoint(tmp_path) == root / "step-3"
    with pytest.raises(ValueError, match="step-9"):
        load_checkpoint(root / "step-9")
    _save(tmp_path, 5)
    assert not (root / ".tmp-step-10").exists()
    assert latest_checkpoint(tmp_path) == root / "step-5"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def _run(script: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(out)], env=env)


def _wait_for(cond, proc, timeout=60.0):
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "writer exited early"
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_sigkill_while_writing_keeps_previous(tmp_path):
    # The second save hangs while pickling its rank state, after the optimizer file is written.
    proc = _run("""
        import sys, time, torch
        from phi3v.checkpoint import save_checkpoint
        class Hang:
            def __reduce__(self):
                time.sleep(600)
        save_checkpoint(sys.argv[1], 1, {"w": torch.ones(4)}, {"step": 1}, {})
        save_checkpoint(sys.argv[1], 2, {"w": torch.zeros(1 << 22)}, {"step": 2}, {}, rank_state={"x": Hang()})
    """, tmp_path)
    tmp = tmp_path / "checkpoints" / ".tmp-step-2"
    try:
        _wait_for(lambda: (tmp / "optim_rank0.pt").exists(), proc)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tmp.exists() and (tmp / "optim_rank0.pt").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))[0]["w"], torch.ones(4))
    _save(tmp_path, 2)
    assert not tmp.exists() and latest_checkpoint(tmp_path).name == "step-2"


def test_sigkill_at_arbitrary_moments(tmp_path):
    # A writer saving 16 MB checkpoints back to back with pruning, killed at some moment.
    for delay in (0.05, 0.3):
        out = tmp_path / str(delay)
        proc = _run("""
            import sys, torch
            from phi3v.checkpoint import save_checkpoint
            for step in range(1, 1000):
                save_checkpoint(sys.argv[1], step, {"w": torch.full((1 << 22,), float(step))},
                                {"step": step}, {"s": step}, keep_last=2)
        """, out)
        try:
            _wait_for(lambda: latest_checkpoint(out) is not None, proc)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        latest = latest_checkpoint(out)
        tensors, optims, meta = load_checkpoint(latest)
        step = int(latest.name.split("-")[1])
        assert meta["s"] == step and optims[0]["step"] == step
        assert torch.equal(tensors["w"], torch.full((1 << 22,), float(step)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.nn.Parameter(torch.randn(3000, generator=g))),
            ("b", torch.nn.Parameter(torch.randn(7, 11, generator=g)))]


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        params = _params()
        opt = ZeroAdamW(params, lr=1e-2)
        for _, p in params:
            p.grad = torch.full_like(p, 0.5 + rank)
        opt.step()
        save_checkpoint(out, 1, dict(params), opt.state_dict(), {"world": world},
                        rank_state={"rank": rank})
    finally:
        dist.destroy_process_group()


def test_two_rank_save_loads_on_one_rank(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    tensors, optims, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert len(optims) == 2 and [s["layout"]["shard_rank"] for s in optims] == [0, 1]
    assert [s["rank"] for s in meta["rank_states"]] == [0, 1] and meta["world"] == 2
    params = _params()
    opt = ZeroAdamW(params, lr=1e-2)
    opt.load_sharded(optims)
    for name, p in params:  # the masters, re-partitioned, reproduce the saved weights
        assert torch.equal(p.data, tensors[name])
    assert opt.step_count == 1 and not torch.equal(tensors["a"], _params()[0][1].data)
