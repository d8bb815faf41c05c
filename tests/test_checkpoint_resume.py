"""Exact resume, refusal of incomplete checkpoints, and the two LoRA export formats."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from identity_grpo.checkpoint import CheckpointError, resolve_checkpoint


def rewards_by_epoch(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["epoch"]: line["reward/ref_tone"] for line in lines}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_subprocess):
    tmp = tmp_path_factory.mktemp("resume")
    straight = train_subprocess("tiny", tmp / "straight", "--config.num_epochs=4", "--config.save_freq=2")
    halted = train_subprocess("tiny", tmp / "halted", "--config.num_epochs=2", "--config.save_freq=2")
    train_subprocess("tiny", tmp / "unused", "--config.num_epochs=4", "--config.save_freq=2",
              f"--config.resume_from={halted}", run_dir=halted)
    # A resumed run continues in its own folder and creates no other.
    assert not (tmp / "unused").exists()
    return straight, halted


def test_resume_reproduces_uninterrupted_run(runs):
    straight, resumed = runs
    a = load_file(straight / "lora" / "adapter_model.safetensors")
    b = load_file(resumed / "lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training did move the LoRA
    ema_a = load_file(straight / "ema" / "lora" / "adapter_model.safetensors")
    ema_b = load_file(resumed / "ema" / "lora" / "adapter_model.safetensors")
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) < 1e-6
    assert any(not torch.equal(ema_a[k], a[k]) for k in a)  # EMA is its own set of weights
    assert rewards_by_epoch(straight) == pytest.approx(rewards_by_epoch(resumed), abs=1e-7)
    assert sorted(rewards_by_epoch(resumed)) == [0, 1, 2, 3]


def test_checkpoint_layout_and_limit(runs):
    straight, _ = runs
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["checkpoint-000002", "checkpoint-000004"]
    state = json.loads((straight / "checkpoints" / "checkpoint-000004" / "state.json").read_text())
    assert state["epoch"] == 4 and state["global_step"] == 4


def test_incomplete_checkpoint_is_refused(runs, tmp_path):
    straight, _ = runs
    broken = tmp_path / "checkpoint-000002"
    shutil.copytree(straight / "checkpoints" / "checkpoint-000002", broken)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        resolve_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        resolve_checkpoint(tmp_path)


def test_diffusers_lora_format_loads_into_wan_vace_pipeline(runs, tiny_vace_dir):
    from diffusers import WanVACEPipeline
    from peft import PeftModel

    straight, _ = runs
    pipe = WanVACEPipeline.from_pretrained(tiny_vace_dir, local_files_only=True)
    latents = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    control = torch.randn(1, 72, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2))
    kwargs = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                  control_hidden_states=control, control_hidden_states_scale=torch.ones(2), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**kwargs)[0]
        pipe.load_lora_weights(straight / "lora_diffusers")
        via_diffusers = pipe.transformer(**kwargs)[0]
        fresh = WanVACEPipeline.from_pretrained(tiny_vace_dir, local_files_only=True).transformer
        via_peft = PeftModel.from_pretrained(fresh, straight / "lora")(**kwargs)[0]
    assert not torch.allclose(base, via_peft, atol=1e-4)
    assert torch.allclose(via_diffusers, via_peft, atol=1e-5)


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Later checkpoints belong to an abandoned continuation: kept on disk, but neither the run
    folder's latest nor counted against the checkpoint limit."""
    from identity_grpo.checkpoint import complete_checkpoints, set_aside_later_checkpoints

    root = tmp_path / "run" / "checkpoints"
    for epoch in (2, 4, 6):
        (root / f"checkpoint-{epoch:06d}").mkdir(parents=True)
        (root / f"checkpoint-{epoch:06d}" / "state.json").write_text(json.dumps({"epoch": epoch}))
    moved = set_aside_later_checkpoints(root / "checkpoint-000002")
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint-000002"]
    assert sorted(p.name for p in moved) == ["checkpoint-000004", "checkpoint-000006"]
    assert json.loads((root / "superseded-checkpoint-000002" / "checkpoint-000006" / "state.json").read_text()) == {
        "epoch": 6}
    assert set_aside_later_checkpoints(root / "checkpoint-000002") == []  # nothing newer left
