"""Checkpoints and writes that fail: every file of a checkpoint is verified before anything on disk
is moved, a broken newest checkpoint falls back to the latest complete one, corrupt files are
named, a failed resume moves nothing, and a full disk is reported with the path being written."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from peft import LoraConfig, get_peft_model

from config.dgx import get_config
from identity_grpo import checkpoint as checkpoint_module
from identity_grpo.checkpoint import CheckpointError, resolve_checkpoint, save_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class TwoLayers(torch.nn.Module):
    """The smallest module with the attention projection names the LoRA config targets."""

    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4)
        self.to_k = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.to_k(self.to_q(x))


def trained_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(TwoLayers(), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k"],
                                                   init_lora_weights="gaussian"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(torch.randn(3, 4)).square().mean().backward()
    optimizer.step()
    return model, optimizer, EMAModel(trainable, decay=0.9)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder with complete checkpoints after epochs 2, 4 and 6."""
    run = tmp_path / "run"
    model, optimizer, ema = trained_parts()
    for epoch in (2, 4, 6):
        save_checkpoint(run, epoch=epoch, global_step=epoch, peft_model=model, optimizer=optimizer, ema=ema)
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was moved or changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint(run: Path, epoch: int) -> Path:
    return run / "checkpoints" / f"checkpoint-{epoch:06d}"


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("name", ["state.json", "optimizer.pt", "ema.pt", "lora/adapter_model.safetensors",
                                  "lora_diffusers/pytorch_lora_weights.safetensors", "lora/adapter_config.json"])
def test_corrupt_file_is_named(run_dir, name):
    corrupt(checkpoint(run_dir, 4) / name)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(checkpoint(run_dir, 4))
    assert f"checkpoint {checkpoint(run_dir, 4)}: {name} cannot be read" in str(error.value)


def test_inconsistent_state_is_refused(run_dir):
    (checkpoint(run_dir, 4) / "state.json").write_text(json.dumps({"epoch": 6, "global_step": 6}))
    with pytest.raises(CheckpointError, match="state.json says epoch 6 but the folder is checkpoint-000004"):
        verify_checkpoint(checkpoint(run_dir, 4))
    (checkpoint(run_dir, 4) / "state.json").write_text(json.dumps({"epoch": 4}))
    with pytest.raises(CheckpointError, match="state.json must hold integer 'epoch' and 'global_step'"):
        verify_checkpoint(checkpoint(run_dir, 4))


def test_explicit_checkpoint_with_corrupt_state_is_refused_and_nothing_moves(run_dir, tmp_path):
    """Issue 12's case: the later, good checkpoints used to be set aside before the failure."""
    import train_wan2_1_vace

    (checkpoint(run_dir, 2) / "state.json").write_text("{not json")
    before = snapshot(run_dir)
    config = get_config("tiny")
    config.pretrained.model = str(tmp_path / "tiny_models" / "wan_vace")
    config.reward_fn = {"ref_tone": 1.0}
    config.dataset = str(ROOT / "dataset" / "generated_img")
    config.logdir, config.tracker = str(tmp_path / "logs"), ""
    config.resume_from = str(checkpoint(run_dir, 2))
    with pytest.raises(CheckpointError) as error:
        train_wan2_1_vace.train(config)
    assert f"{checkpoint(run_dir, 2)}: state.json cannot be read" in str(error.value)
    assert snapshot(run_dir) == before
    assert not (tmp_path / "logs").exists()
    # The run folder still resumes from its latest checkpoint, which is intact.
    assert resolve_checkpoint(run_dir) == checkpoint(run_dir, 6)


@pytest.mark.parametrize("damage", ["missing_file", "corrupt_file"])
def test_run_folder_falls_back_to_the_latest_complete_checkpoint(run_dir, caplog, damage):
    if damage == "missing_file":
        (checkpoint(run_dir, 6) / "optimizer.pt").unlink()
    else:
        corrupt(checkpoint(run_dir, 6) / "lora" / "adapter_model.safetensors")
    before = snapshot(run_dir)
    with caplog.at_level(logging.WARNING, logger="identity_grpo.checkpoint"):
        assert resolve_checkpoint(run_dir) == checkpoint(run_dir, 4)
    assert "resuming from checkpoint-000004, the latest complete one" in caplog.text
    assert str(checkpoint(run_dir, 6)) in caplog.text
    assert ("optimizer.pt" if damage == "missing_file" else "adapter_model.safetensors cannot be read") in caplog.text
    assert snapshot(run_dir) == before


def test_run_folder_without_any_usable_checkpoint_lists_every_problem(run_dir):
    for epoch in (2, 4, 6):
        (checkpoint(run_dir, epoch) / "state.json").write_text("")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as error:
        resolve_checkpoint(run_dir)
    assert all(str(checkpoint(run_dir, epoch)) in str(error.value) for epoch in (2, 4, 6))


# ------------------------------------------------------------------ full disk


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_enforce(*args, **kwargs):
    # What torch.save raises on a full disk: a C++ enforce message naming no file.
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                       "data/0: file write failed")


@pytest.mark.parametrize("failure", [_disk_full, _torch_enforce])
def test_full_disk_while_saving_names_the_path_and_keeps_earlier_checkpoints(run_dir, monkeypatch, failure):
    before = snapshot(run_dir)
    model, optimizer, ema = trained_parts(seed=1)
    monkeypatch.setattr(checkpoint_module.torch, "save", failure)
    if failure is _torch_enforce:  # the disk is really full then: nothing left on it
        monkeypatch.setattr(checkpoint_module, "_free_bytes", lambda path: 0)
    with pytest.raises(OSError) as error:
        save_checkpoint(run_dir, epoch=8, global_step=8, peft_model=model, optimizer=optimizer, ema=ema, limit=2)
    assert error.value.errno == errno.ENOSPC
    assert "the disk is full" in str(error.value)
    assert str(run_dir / "checkpoints" / ".tmp-checkpoint-000008") in str(error.value)
    # Nothing half-written is left, and the limit did not delete a good checkpoint.
    assert snapshot(run_dir) == before


def test_other_write_errors_name_the_path_but_are_not_called_a_full_disk(run_dir, monkeypatch):
    model, optimizer, ema = trained_parts(seed=1)
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda *a, **k: _raise(PermissionError(errno.EACCES, "no")))
    with pytest.raises(OSError) as error:
        save_checkpoint(run_dir, epoch=8, global_step=8, peft_model=model, optimizer=optimizer, ema=ema)
    assert "writing a checkpoint to" in str(error.value) and "disk is full" not in str(error.value)


def _raise(error):
    raise error


def test_full_disk_while_writing_a_video_names_the_video(tmp_path, monkeypatch):
    import imageio

    from identity_grpo.loop import write_video

    monkeypatch.setattr(imageio, "get_writer", _disk_full)
    with pytest.raises(OSError, match="the disk is full") as error:
        write_video(tmp_path / "0.mp4", torch.zeros(5, 16, 16, 3, dtype=torch.uint8), fps=8)
    assert str(tmp_path / "0.mp4") in str(error.value)


def test_a_later_save_still_works_after_a_failed_one(run_dir, monkeypatch):
    model, optimizer, ema = trained_parts(seed=1)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.torch, "save", _disk_full)
        with pytest.raises(OSError):
            save_checkpoint(run_dir, epoch=8, global_step=8, peft_model=model, optimizer=optimizer, ema=ema)
    saved = save_checkpoint(run_dir, epoch=8, global_step=8, peft_model=model, optimizer=optimizer, ema=ema)
    assert verify_checkpoint(saved)["epoch"] == 8
    shutil.rmtree(saved)
