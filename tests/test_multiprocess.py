"""Two processes on CPU (gloo): groups span ranks and are normalised together; ranks stay in sync,
with GRPO and with DiffusionNFT (whose old adapter is switched in and out around DDP)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("preset, port", [("tiny", 29517), ("tiny_nft", 29518)])
def test_two_process_training(tmp_path, tiny_vace_dir, preset, port):
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    command = torchrun.split() + [
        "--nproc_per_node", "2", "--master_port", str(port), str(ROOT / "train_wan2_1_vace.py"),
        "--config", str(ROOT / "config/dgx.py") + f":{preset}", f"--config.pretrained.model={tiny_vace_dir}",
        f"--config.logdir={tmp_path}", "--config.tracker=", "--config.num_epochs=2", "--config.eval_freq=0",
        # 4 videos per rank, K = 8: every group has 4 members on each rank.
        "--config.sample.train_batch_size=4", "--config.sample.num_batches_per_epoch=2",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "processes = 2" in done.stdout + done.stderr
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["lora_checksums"]
    assert first == second  # the script also raises if they differ
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        # Rewards of both ranks were gathered: 2 batches x 1 group of 8 (4 from each rank).
        assert metrics["reward/num_groups"] == 2
        assert metrics["reward/mean_group_size"] == 8
