"""Test helpers: run train.py as a real CLI and read its outputs (test_train.py), write tiny videos
and raw inputs of every preset's dataset (test_convert.py, test_train.py; no network)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
for _k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "train.py", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *args]


def train(args: list[str], nproc: int = 1, check: bool = True, env: dict | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run train.py to the end; on failure (with `check`) show its output in the assertion."""
    p = subprocess.run(command([str(a) for a in args], nproc), cwd=REPO, env={**ENV, **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def start(args: list[str], log: Path, nproc: int = 1) -> subprocess.Popen:
    """Start train.py in the background (stdout+stderr to `log`), for killing it mid-run."""
    f = open(log, "w")
    p = subprocess.Popen(command([str(a) for a in args], nproc), cwd=REPO, env=ENV, stdout=f,
                         stderr=subprocess.STDOUT, start_new_session=True)
    f.close()
    return p


def kill_when(p: subprocess.Popen, cond, log: Path, timeout: float = 300, poll: float = 0.001) -> None:
    """SIGKILL the process (group, so torchrun's workers too) as soon as `cond()` holds.

    Polls every `poll` seconds: often enough to land inside a checkpoint save, rarely enough not
    to steal a core from the run (busy polling slows its 2 OpenMP threads down tenfold)."""
    t0 = time.monotonic()
    while not cond():
        time.sleep(poll)
        if p.poll() is not None:
            raise AssertionError(f"train.py exited ({p.returncode}) before the kill point\n{log.read_text()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise AssertionError("kill point not reached in time")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    """Everything a run's result consists of: the exported adapter, the step checkpoint's weights
    and every optimizer tensor (masters and moments of all shards)."""
    out = Path(out)
    state = {f"adapter/{k}": v for k, v in load_file(out / "adapter_model.safetensors").items()}
    ck = out / "checkpoints" / f"step-{step}"
    state.update({f"weights/{k}": v for k, v in load_file(ck / "weights.safetensors").items()})
    for name, t in optimizer_flat(ck).items():
        state[f"optim/{name}"] = t
    return state


def optimizer_flat(ck: Path) -> dict[str, torch.Tensor]:
    """The optimizer's master/exp_avg/exp_avg_sq as one flat tensor each (shards concatenated,
    padding cut), so states written by different world sizes compare directly; plus the step."""
    shards = [torch.load(p, map_location="cpu", weights_only=True)
              for p in sorted(ck.glob("optim_rank*.pt"), key=lambda p: int(p.stem[len("optim_rank"):]))]
    assert shards, f"no optimizer shards in {ck}"
    numel = shards[0]["layout"]["numel"]
    out = {}
    for name in ("master", "exp_avg", "exp_avg_sq"):
        out[name] = torch.cat([s[name] for s in shards])[:numel]
    out["step"] = torch.tensor([s["step"] for s in shards][0])
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)
    return worst


def differing(a: dict, b: dict) -> list[str]:
    """Keys whose tensors are not bitwise equal."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


def _no_nan(token):
    raise ValueError(f"not JSON: {token}")


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl, parsed strictly (NaN/Infinity are not JSON)."""
    return [json.loads(line, parse_constant=_no_nan)
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def copy_truncated(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a finished run as it was right after checkpoint `keep_step` (later checkpoints
    and the exported results removed): what an interruption at that point leaves behind."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > keep_step:
            shutil.rmtree(d)
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png"):
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / "merged", ignore_errors=True)
    return dst


# ---------------------------------------------------------------- tiny raw inputs for the presets

def png(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(color)).save(path)


def make_video(path: Path, n: int, color=lambda i: (i * 12, 128, 128), container: str | None = None) -> None:
    """An n-frame 16x16 MJPEG video whose frame i is filled with color(i) (RGB)."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    c = av.open(str(path), "w", format=container)
    s = c.add_stream("mjpeg", rate=25)
    s.width, s.height, s.pix_fmt = 16, 16, "yuvj420p"
    for i in range(n):
        a = np.zeros((16, 16, 3), np.uint8)
        a[:] = color(i)
        for pk in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(pk)
    for pk in s.encode():
        c.mux(pk)
    c.close()


def ucf101_raw(root: Path) -> Path:
    for split, n in (("train", 2), ("val", 1)):
        for k, cls in enumerate(("Archery", "Bowling")):
            for i in range(n):
                make_video(root / split / cls / f"v_{cls}_g{i + 1:02d}_c01.avi", 8,
                           lambda j, shade=60 * k + 20 * i: (shade, 10 * j, 128))
    return root


def docvqa_raw(root: Path) -> Path:
    """The official DocVQA json layout (one file per split, images beside it)."""
    for split, n in (("train", 4), ("val", 2)):
        items = []
        for i in range(n):
            png(root / split / "documents" / f"d{i}.png", (30 * i, 200, 100), size=(60, 80))
            items.append({"questionId": f"{split}{i}", "question": f"What is on page {i}?",
                          "image": f"documents/d{i}.png", "answers": [f"page {i}", f"p{i}"]})
        (root / split / f"{split}_v1.0.json").write_text(json.dumps({"dataset_split": split, "data": items}))
    return root


def hateful_memes_raw(root: Path) -> Path:
    """The Facebook release layout: img/ + train.jsonl, dev_seen.jsonl."""
    for name, ids in (("train", range(4)), ("dev_seen", range(4, 6))):
        lines = []
        for i in ids:
            png(root / "img" / f"{i:05d}.png", (40 * i, 10, 10))
            lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": f"meme {i}"}))
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def nlvr2_raw(root: Path) -> Path:
    """The official NLVR2 layout: train.json / dev.json lines, images/{split}/<id>-img{0,1}.png."""
    for name, n in (("train", 4), ("dev", 2)):
        lines = []
        for i in range(n):
            for k in (0, 1):
                png(root / "images" / name / f"{name}-{i}-0-img{k}.png", (50 * i, 90 * k, 30))
            lines.append(json.dumps({"identifier": f"{name}-{i}-0-0", "sentence": f"There are {i} dogs.",
                                     "label": "True" if i % 2 else "False"}))
        (root / f"{name}.json").write_text("\n".join(lines) + "\n")
    return root
