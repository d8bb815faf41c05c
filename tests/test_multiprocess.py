"""Two processes on CPU (gloo), launched with the shipped accelerate configs: groups span ranks and
are normalised together; ranks stay in sync, with GRPO, DiffusionNFT (whose old adapter is
switched in and out around DDP) and EvoID. Under FSDP2 (scripts/accelerate_configs/fsdp2.yaml) the same runs
give the same LoRA, EMA and optimizer state as under DDP, and resume exactly.

accelerate runs CPU ranks as MULTI_CPU and ignores FSDP there, so the FSDP2 runs here are sharded
by the training script itself (identity_grpo.models.shard_transformer, torch's ``fully_shard``),
from the settings ``accelerate launch`` reads out of fsdp2.yaml: the code that shards on GPUs.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "accelerate_configs"
# LoRA tensors written by a run: the result in both formats, its EMA, and a checkpoint's.
LORA_FILES = ("lora/adapter_model.safetensors", "lora_diffusers/pytorch_lora_weights.safetensors",
              "ema/lora/adapter_model.safetensors", "checkpoints/checkpoint-000001/lora/adapter_model.safetensors")


def launch(accelerate_config, preset, logdir, port, *overrides, run_dir=None):
    """``train_wan2_1_vace.py`` on 2 CPU processes under ``accelerate launch --config_file
    accelerate_config``: 2 epochs of 2 batches x 4 videos per rank (K = 8: every group has 4
    members on each rank), KL to the disabled adapter, EMA, gradient checkpointing, a checkpoint
    after every epoch. Returns the run folder."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port),
        str(ROOT / "train_wan2_1_vace.py"), "--config", str(ROOT / "config/dgx.py") + f":{preset}",
        f"--config.logdir={logdir}", "--config.tracker=", "--config.report=False", "--config.num_epochs=2",
        "--config.eval_freq=0", "--config.sample.train_batch_size=4", "--config.sample.num_batches_per_epoch=2",
        "--config.train.ema=True", "--config.train.beta=0.01", "--config.train.gradient_checkpointing=True",
        "--config.save_freq=1", "--config.num_checkpoint_limit=0", *overrides,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "processes = 2" in done.stdout + done.stderr
    if run_dir is None:
        (run_dir,) = [p for p in Path(logdir).iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_vace_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    return {preset: launch(CONFIGS / "multi_gpu.yaml", preset, tmp / preset, port,
                           f"--config.pretrained.model={tiny_vace_dir}")
            for preset, port in (("tiny", 29517), ("tiny_nft", 29518), ("tiny_evoid", 29519))}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_vace_dir):
    """FSDP2 runs of both presets, and tiny_nft resumed from its first checkpoint."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model = f"--config.pretrained.model={tiny_vace_dir}"
    runs = {preset: launch(CONFIGS / "fsdp2.yaml", preset, tmp / preset, port, model)
            for preset, port in (("tiny", 29527), ("tiny_nft", 29528))}
    halted = tmp / "halted"
    shutil.copytree(runs["tiny_nft"], halted)
    shutil.rmtree(halted / "checkpoints" / "checkpoint-000002")
    for name in ("lora", "ema", "summary.json", "metrics.jsonl"):
        path = halted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    runs["resumed"] = launch(CONFIGS / "fsdp2.yaml", "tiny_nft", tmp / "unused", 29529, model,
                             f"--config.resume_from={halted}", run_dir=halted)
    return runs


def max_difference(run_a, run_b, name):
    a, b = load_file(run_a / name), load_file(run_b / name)
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_nft", "tiny_evoid"])
def test_two_process_training(ddp_runs, preset):
    run_dir = ddp_runs[preset]
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["lora_checksums"]
    assert first == second  # the script also raises if they differ
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        # Rewards of both ranks were gathered: 2 batches x 1 group of 8 (4 from each rank).
        assert metrics["reward/num_groups"] == 2
        assert metrics["reward/mean_group_size"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_nft"])
def test_fsdp2_training_equals_ddp(ddp_runs, fsdp_runs, preset):
    """Same rollouts, rewards and updates: the LoRA differs from DDP's only by float rounding
    (gradients are summed in another order; Adam amplifies that where a gradient is near 0)."""
    ddp, fsdp = ddp_runs[preset], fsdp_runs[preset]
    trained = load_file(ddp / LORA_FILES[0])
    moved = max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k)  # lora_B starts at 0
    assert moved > 1e-2
    for name in LORA_FILES:
        assert max_difference(ddp, fsdp, name) < 1e-4, name
    for epoch in (1, 2):  # the optimizer and EMA state gathered from the shards
        folder = Path("checkpoints") / f"checkpoint-{epoch:06d}"
        optimizer_a, optimizer_b = (torch.load(run / folder / "optimizer.pt", weights_only=True) for run in (ddp, fsdp))
        assert optimizer_a["state"].keys() == optimizer_b["state"].keys()
        for index, state in optimizer_a["state"].items():
            assert torch.equal(state["step"], optimizer_b["state"][index]["step"])
            assert torch.allclose(state["exp_avg"], optimizer_b["state"][index]["exp_avg"], atol=1e-6)
        ema_a, ema_b = (torch.load(run / folder / "ema.pt", weights_only=False) for run in (ddp, fsdp))
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ema_a["shadow_params"], ema_b["shadow_params"],
                                                                     strict=True))
    checksums_ddp = json.loads((ddp / "summary.json").read_text())["lora_checksums"]
    checksums_fsdp = json.loads((fsdp / "summary.json").read_text())["lora_checksums"]
    assert checksums_fsdp[0] == checksums_fsdp[1]  # every rank's gathered weights agree
    assert checksums_fsdp[0] == pytest.approx(checksums_ddp[0], rel=1e-5)
    rewards = [[json.loads(line)["reward/ref_tone"] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (ddp, fsdp)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)


@pytest.mark.slow
def test_fsdp2_resume_is_exact(fsdp_runs):
    """tiny_nft under FSDP2 resumed from its epoch-1 checkpoint (LoRA, optimizer, EMA and old
    adapter loaded into the shards) ends where the uninterrupted run ended."""
    straight, resumed = fsdp_runs["tiny_nft"], fsdp_runs["resumed"]
    for name in LORA_FILES[:3] + ("checkpoints/checkpoint-000002/lora/adapter_model.safetensors",):
        assert max_difference(straight, resumed, name) < 1e-6, name
    folder = Path("checkpoints") / "checkpoint-000002"
    old_a, old_b = (torch.load(run / folder / "old_policy.pt", weights_only=True) for run in (straight, resumed))
    assert old_a.keys() == old_b.keys()
    assert max((old_a[k] - old_b[k]).abs().max().item() for k in old_a) < 1e-6
    rewards = [[json.loads(line)["reward/ref_tone"] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (straight, resumed)]
    assert rewards[1] == pytest.approx(rewards[0][1:], abs=1e-7)  # the resumed run logs epoch 1 only
