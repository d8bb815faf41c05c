"""Context parallelism (Ulysses, 2 CPU ranks over gloo) gives the 1-rank rollouts, re-scored
log-probs and gradients, for the VACE plan written here and diffusers' text-to-video (Phantom) plan.

Ring attention needs an attention backend that returns the log-sum-exp (flash-attn, cuDNN: CUDA
only), so it is not run here.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_vace_dir):
    out = tmp_path_factory.mktemp("context_parallel")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests" / "context_parallel_worker.py"), str(tiny_vace_dir), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_vace_rollouts_and_rescoring_match_one_rank(ranks):
    for result in ranks:
        assert result["vace_latents_max_diff"] == 0.0
        assert result["vace_log_probs_equal"] and result["vace_frames_equal"] and result["vace_rescore_equal"]


def test_vace_gradients_summed_over_ranks_match_one_rank(ranks):
    for result in ranks:
        assert result["vace_grad_count"] > 100  # every transformer weight, not a few
        assert result["vace_grad_rel_error"] < 1e-5


def test_phantom_t2v_transformer_matches_one_rank(ranks):
    for result in ranks:
        assert result["t2v_output_equal"]
        assert result["t2v_grad_count"] > 50 and result["t2v_grad_rel_error"] < 1e-5


def test_ulysses_degree_must_divide_the_heads():
    from identity_grpo.context_parallel import enable_context_parallel
    from identity_grpo.testing import build_vace_transformer

    with pytest.raises(ValueError, match="divides them"):
        enable_context_parallel(build_vace_transformer(), 3)  # 2 heads


def train(logdir, processes, port, tiny_vace_dir, *overrides):
    """``train_wan2_1_vace.py`` (tiny preset, 2 epochs of 2 batches of 4 videos, K = 4, KL and EMA
    on) on ``processes`` CPU processes; returns the run folder."""
    script = [str(ROOT / "train_wan2_1_vace.py"), "--config", str(ROOT / "config/dgx.py") + ":tiny",
              f"--config.pretrained.model={tiny_vace_dir}", f"--config.logdir={logdir}", "--config.tracker=",
              "--config.report=False", "--config.num_epochs=2", "--config.eval_freq=0", "--config.save_freq=0",
              "--config.sample.train_batch_size=4", "--config.sample.num_batches_per_epoch=2",
              "--config.sample.num_image_per_prompt=4", "--config.train.ema=True", "--config.train.beta=0.01",
              # Adam with eps 1 steps nearly in proportion to the gradient (its usual step does not
              # see the gradient's size), so a gradient of the wrong size changes the LoRA.
              "--config.train.adam_epsilon=1.0", "--config.train.learning_rate=1.0",
              "--config.train.gradient_checkpointing=True", *overrides]  # as the real presets train
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "scripts" / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port)]
    done = subprocess.run(launcher + script, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (run_dir,) = [p for p in Path(logdir).iterdir() if p.is_dir()]
    return run_dir, done.stdout + done.stderr


@pytest.mark.parametrize("preset_overrides", [(), ("--config.algorithm=nft", "--config.sample.eval_sde=False")],
                         ids=["grpo", "nft"])
def test_training_on_two_context_parallel_ranks_gives_the_one_process_lora(tmp_path, tiny_vace_dir, preset_overrides):
    """``context_parallel_degree = 2`` on 2 processes: both ranks run the same batch, each with
    half of the tokens, and the DDP-averaged gradient scaled by the degree is the whole one, so the
    optimizer steps give the LoRA, its EMA and the evaluation of one process (float tolerance).
    Without the scaling the steps are half as long (measured: the test fails)."""
    from safetensors.torch import load_file

    one, _ = train(tmp_path / "one", 1, 0, tiny_vace_dir, *preset_overrides)
    two, log = train(tmp_path / "two", 2, free_port(), tiny_vace_dir, "--config.context_parallel_degree=2",
                     *preset_overrides)
    assert "processes = 2 (context-parallel degree 2)" in log
    for name in ("lora/adapter_model.safetensors", "ema/lora/adapter_model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
        assert moved > 1e-4  # training moved the adapter (lora_B starts at 0)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * moved, name
    after_one = json.loads((one / "summary.json").read_text())["eval_after"]
    after_two = json.loads((two / "summary.json").read_text())["eval_after"]
    assert after_one.keys() == after_two.keys()
    assert all(abs(after_one[k] - after_two[k]) < 1e-4 for k in after_one)


def test_context_parallel_degree_must_match_the_processes():
    from config.dgx import get_config
    from identity_grpo.configuration import validate_config

    config = get_config("tiny")
    config.context_parallel_degree = 2
    with pytest.raises(ValueError, match=r"context_parallel_degree \(2\) must equal the number of processes \(4\)"):
        validate_config(config, num_processes=4)
    config.sample.train_batch_size, config.sample.num_image_per_prompt = 4, 4
    validate_config(config, num_processes=2)  # one replica: 4 videos, one group of 4
