"""``test_wan2_1_vace.py`` end to end on the tiny models: files, scores, summary, base vs LoRA,
determinism and the error for a missing LoRA. Runs the real entry point in three concurrent
subprocesses (mostly import time; generation takes under a second)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# tiny, plus the inference-only fields (eval_baseline, facesim) that config/base.py may not have.
CONFIG = """
import importlib.util
_spec = importlib.util.spec_from_file_location("dgx_presets", {dgx!r})
dgx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dgx)


def get_config():
    config = dgx.tiny()
    if "eval_baseline" not in config:
        config.eval_baseline = False
    config.facesim = {{"backend": "tiny"}}
    return config
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, dataset_dir):
    """Tiny models, a config file, and two LoRA folders: one with random ``lora_B`` (changes the
    model) and one with peft's zero ``lora_B`` (leaves it unchanged)."""
    from diffusers import WanVACETransformer3DModel
    from peft import LoraConfig, get_peft_model

    from identity_grpo.testing import randomize_lora_b, write_tiny_aesthetics, write_tiny_vace

    root = tmp_path_factory.mktemp("inference")
    models = write_tiny_vace(root / "wan_vace")
    # OpenS2V's Aesthetics from local files; the tiny head scores every frame 6.5.
    clip_folder, aesthetic_head = write_tiny_aesthetics(root / "aesthetics", score=6.5)
    config_file = root / "inference_config.py"
    config_file.write_text(CONFIG.format(dgx=str(ROOT / "config" / "dgx.py")))
    loras = {}
    for name, std in (("nonzero", 1.0), ("zero", 0.0)):
        transformer = WanVACETransformer3DModel.from_pretrained(models, subfolder="transformer")
        model = get_peft_model(transformer, LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        randomize_lora_b(model, std=std, seed=0)
        model.save_pretrained(root / name)
        loras[name] = root / name
    return {"root": root, "models": models, "config": config_file, "loras": loras, "dataset": dataset_dir,
            "aesthetics": (clip_folder, aesthetic_head)}


def launch(setup, name: str, lora: str | Path, *extra: str, processes: int = 1) -> tuple[Path, subprocess.Popen]:
    logdir = setup["root"] / "runs" / name
    launcher = [sys.executable]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [
        *launcher, str(ROOT / "test_wan2_1_vace.py"), "--config", str(setup["config"]),
        f"--config.pretrained.model={setup['models']}", f"--config.pretrained.reward_model={setup['root'] / 'tiny_models' / 'reward'}",
        f"--config.dataset={setup['dataset']}", f"--config.logdir={logdir}", f"--config.train.lora_path={lora}",
        # The light setting: 2 ODE steps instead of the preset's 4 SDE steps.
        "--config.sample.eval_sde=False", "--config.sample.eval_num_steps=2",
        f"--config.opens2v.clip_path={setup['aesthetics'][0]}", f"--config.opens2v.aesthetic_head_path={setup['aesthetics'][1]}",
        *extra,
    ]
    # One thread each: the runs share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return logdir, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)


def finish(logdir: Path, process: subprocess.Popen, *, expect_success: bool = True) -> tuple[Path | None, str]:
    output, _ = process.communicate(timeout=300)
    if not expect_success:
        assert process.returncode != 0, output[-3000:]
        return None, output
    assert process.returncode == 0, output[-3000:]
    (out_dir,) = logdir.glob("test_tiny_*")
    # The only line on stdout outside the logs is the output folder.
    assert output.strip().splitlines()[-1] == str(out_dir)
    return out_dir, output


@pytest.fixture(scope="module")
def runs(setup):
    """Base vs LoRA for the nonzero and the zero LoRA (the base model runs twice: the determinism
    check), and a LoRA folder that does not exist."""
    launched = {
        "nonzero": launch(setup, "nonzero", setup["loras"]["nonzero"], "--config.eval_baseline=True"),
        "zero": launch(setup, "zero", setup["loras"]["zero"], "--config.eval_baseline=True"),
        "missing": launch(setup, "missing", setup["root"] / "no_such_lora"),
    }
    return {"nonzero": finish(*launched["nonzero"])[0], "zero": finish(*launched["zero"])[0],
            "missing": finish(*launched["missing"], expect_success=False)[1]}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def decode(path: Path) -> np.ndarray:
    import imageio

    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader])


def test_videos_references_and_scores(setup, runs):
    from identity_grpo.data import ReferenceVideoDataset

    test_set = ReferenceVideoDataset(setup["dataset"], "test")
    out_dir = runs["nonzero"]
    # The tiny FaceSim backend labels its columns FaceSim-tiny (FaceSim-Arc is the ArcFace backend's).
    reward_keys = ["ref_tone", "identity", "total", "FaceSim-tiny", "FaceSim-tiny/min", "CopyPaste", "CopyPaste/max",
                   "OpenS2V/Motion", "OpenS2V/Aesthetics"]
    for variant in ("base", "lora"):
        rows = read_csv(out_dir / variant / "scores.csv")
        assert [int(row["index"]) for row in rows] == list(range(len(test_set)))
        for row, item in zip(rows, test_set.items):
            assert row["prompt"] == item.prompt
            assert row["ref_paths"] == ";".join(path.name for path in item.reference_paths)
            for copy, source in zip(row["reference_copies"].split(";"), item.reference_paths, strict=True):
                assert (out_dir / copy).read_bytes() == source.read_bytes()
            # tiny preset: eval_frames 5 of eval_height x eval_width 32 x 32.
            assert decode(out_dir / row["video"]).shape == (5, 32, 32, 3)
            for key in reward_keys:
                assert math.isfinite(float(row[key])), (variant, key, row)
            assert float(row["OpenS2V/Aesthetics"]) == pytest.approx(6.5, abs=1e-6)
        assert len(list((out_dir / variant / "videos").glob("*.mp4"))) == len(test_set)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["count"] == len(test_set)
    assert summary["lora_path"] == str(setup["loras"]["nonzero"])
    assert summary["config"].endswith("inference_config.py")
    side_by_side = read_csv(out_dir / "scores.csv")
    assert len(side_by_side) == len(test_set)
    for variant, means in (("lora", summary["means"]), ("base", summary["base_means"])):
        assert set(reward_keys) <= set(means)
        for key, mean in means.items():
            values = [float(row[f"{variant}/{key}"]) for row in side_by_side if row.get(f"{variant}/{key}", "") != ""]
            assert mean == pytest.approx(sum(values) / len(values), abs=1e-9), (variant, key)
    for key in reward_keys:
        assert summary["difference"][key] == pytest.approx(summary["means"][key] - summary["base_means"][key])


def test_nonzero_lora_changes_the_videos_zero_lora_does_not(runs):
    changed = runs["nonzero"]
    for index in range(3):
        base, lora = (decode(changed / variant / "videos" / f"{index:05d}.mp4") for variant in ("base", "lora"))
        assert np.abs(base.astype(int) - lora.astype(int)).mean() > 1.0, index
    unchanged = runs["zero"]
    for index in range(3):
        base, lora = (decode(unchanged / variant / "videos" / f"{index:05d}.mp4") for variant in ("base", "lora"))
        np.testing.assert_array_equal(base, lora)
    rows = read_csv(unchanged / "scores.csv")
    assert all(row["base/total"] == row["lora/total"] for row in rows)


def test_rerun_gives_identical_scores_and_videos(runs):
    """Both runs generate the base model with the same per-row noise in separate processes."""
    first = read_csv(runs["nonzero"] / "base" / "scores.csv")
    again = read_csv(runs["zero"] / "base" / "scores.csv")
    assert again == first
    for row in first:
        np.testing.assert_array_equal(decode(runs["zero"] / row["video"]), decode(runs["nonzero"] / row["video"]))


def test_missing_lora_names_the_field(runs):
    assert "train.lora_path" in runs["missing"]
    assert "no_such_lora" in runs["missing"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(setup, runs):
    """Rows sharded over two CPU ranks (accelerate, gloo): same merged scores, same videos."""
    out_dir, _ = finish(*launch(setup, "two_ranks", setup["loras"]["nonzero"], "--config.eval_baseline=True",
                                processes=2))
    assert read_csv(out_dir / "scores.csv") == read_csv(runs["nonzero"] / "scores.csv")
    for video in sorted((runs["nonzero"] / "lora" / "videos").glob("*.mp4")):
        np.testing.assert_array_equal(decode(out_dir / "lora" / "videos" / video.name), decode(video))
