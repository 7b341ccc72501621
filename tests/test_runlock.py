"""phi3v.runlock: one run per output directory (train.py's use, end to end, is in test_train.py)."""
import json
import os
import socket
import subprocess
import sys
import types

import pytest

from phi3v import runlock
from phi3v.runlock import lock_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import sys; from phi3v.runlock import lock_dir; lock_dir(sys.argv[1]); print('locked', flush=True); input()"


def test_held_lock_refused_killed_runs_lock_taken_over(tmp_path):
    """Another process holds the lock: refused, naming the directory and its pid, host and start. It
    ends without releasing (as if killed): the lock is taken over with a note naming it; released,
    the file is gone and the next lock has nothing to report."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = json.loads((out / ".lock").read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(ValueError) as e:
            lock_dir(out)
        assert str(e.value) == (f"{out} is in use by another run (pid {holder.pid} on host {owner['host']}, "
                                f"started {owner['started']})")
    finally:
        holder.communicate("\n", timeout=60)
    lock, note = lock_dir(out)
    assert note == (f"{out}: took over the lock of run pid {holder.pid} on host {owner['host']} started "
                    f"{owner['started']} (no longer running)")
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    lock.release()
    assert not (out / ".lock").exists()
    lock, note = lock_dir(out)
    assert note is None
    lock.release()


def test_without_fcntl_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    out = tmp_path / "a" / "b"
    lock, note = lock_dir(out)
    assert note is None and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ValueError, match=f"is in use by another run \\(pid {os.getpid()} on host .*; if that run "
                                         "has ended, delete .*\\.lock"):
        lock_dir(out)
    lock.release()
    assert not (out / ".lock").exists()
    lock_dir(out)[0].release()


def test_a_lock_file_deleted_meanwhile_is_not_the_one_held(tmp_path, monkeypatch):
    """The holder releases (deletes the file) between our open and our lock: the lock we got is on a
    file no longer at the path, so lock_dir starts over and holds the file that is there."""
    import fcntl
    out = tmp_path / "out"
    calls = []

    def lockf(fd, flags):
        if not calls:                              # the holder's release, just before our lock
            (out / ".lock").unlink()
        calls.append(fd)
        fcntl.lockf(fd, flags)
    monkeypatch.setattr(runlock, "fcntl", types.SimpleNamespace(lockf=lockf, LOCK_EX=fcntl.LOCK_EX,
                                                               LOCK_NB=fcntl.LOCK_NB))
    lock, _ = lock_dir(out)
    assert len(calls) == 2
    assert os.fstat(lock.fd).st_ino == os.stat(out / ".lock").st_ino
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
