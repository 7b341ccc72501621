"""Shared fixtures: where the golden files are, seeding, and skip rules for optional extras."""
import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
