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


@pytest.fixture(scope="session")
def train_subprocess(tiny_vace_dir):
    """``run(preset, logdir, *overrides, run_dir=None)``: ``train_wan2_1_vace.py`` in a subprocess on the
    tiny models (no tracker, no evaluation, EMA on, KL weight 0.01, 16 videos per batch); returns the run
    folder (the only folder under ``logdir`` unless ``run_dir`` is given, e.g. for a resume)."""
    import subprocess
    import sys

    def run(preset, logdir, *overrides, run_dir=None):
        command = [
            sys.executable, str(ROOT / "train_wan2_1_vace.py"), "--config", f"{ROOT / 'config' / 'dgx.py'}:{preset}",
            f"--config.pretrained.model={tiny_vace_dir}", f"--config.logdir={logdir}", "--config.tracker=",
            "--config.eval_freq=0", "--config.train.ema=True", "--config.train.beta=0.01",
            "--config.sample.train_batch_size=16", *overrides,
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        if run_dir is None:
            (run_dir,) = [p for p in Path(logdir).iterdir() if p.is_dir()]
        return run_dir

    return run


def _world_learning_items(session) -> dict:
    """The selected tests of tests/test_world_learns.py, by module."""
    items = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.endswith("test_world_learns"):
            items.setdefault(module, []).append(item)
    return items


def pytest_collection_finish(session):
    """Start the tiny world's learning runs (tests/test_world_learns.py, most of the suite's
    CPU-minutes) that the selected tests read, in the background as soon as they are collected,
    so they overlap the rest of the suite."""
    if session.config.option.collectonly:
        return
    for module, items in _world_learning_items(session).items():
        module.BACKGROUND.start(module.runs_read_by(items))


def pytest_sessionfinish(session, exitstatus):
    """Stop the world's runs; their logs stay (the folder is named in failures) if anything failed."""
    for module in _world_learning_items(session):
        runs = module.BACKGROUND
        runs.stop(keep_logs=exitstatus != 0)
        if runs.root is not None and runs.root.exists():
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"tiny world runs (logs, LoRAs, summaries) kept in {runs.root}")
