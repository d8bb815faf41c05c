"""Shared fixtures: tiny offline models written once per session, the synthetic dataset."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "dataset" / "generated_img"


@pytest.fixture(scope="session")
def tiny_vace_dir(tmp_path_factory) -> Path:
    from identity_grpo.testing import write_tiny_vace

    return write_tiny_vace(tmp_path_factory.mktemp("models") / "wan_vace")


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    return DATASET
