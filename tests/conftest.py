"""Shared fixtures: where the golden files are, the demo model and data, seeding."""
import os
from pathlib import Path

import atexit
import shutil
import tempfile

import pytest
import torch

# every dataset index the tests build (and every train.py they start) caches into a folder of this run
os.environ["PHI3V_CACHE"] = tempfile.mkdtemp(prefix="phi3v-cache-")
atexit.register(shutil.rmtree, os.environ["PHI3V_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo beside ../shared; PHI3V_GOLDEN overrides (e.g. on the GPU machine).
GOLDEN = Path(os.environ.get("PHI3V_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.exists():
        pytest.skip(f"golden fixtures not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_ckpt(golden_dir) -> Path:
    return golden_dir / "tiny-phi3v"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The built-in tiny model (`model/`, num_crops 1) and a small demo dataset (`data/`: 8 training and
    4 validation clips of 8 frames), written once for the whole session; tests must not modify them."""
    from phi3v import demo
    root = tmp_path_factory.mktemp("demo")
    demo.write_base_model(root / "model", num_crops=1)
    demo.write_dataset(root / "data", n_train=8, n_val=4, n_test=0)
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
