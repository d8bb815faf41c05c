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
