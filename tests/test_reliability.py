"""Bad input through the public entry points: refused before any model loads, the message naming
the file, row and field (or config field) to fix, and nothing created on disk.

Categories (issue 12): user data (CSV shape and encoding, images), impossible settings, model and
reward folders, reward values, zero-advantage epochs, metrics files, and each entry point: the
train script's ``train(config)``, the batch inference script, ``python -m vace_reward.inference``
and ``python -m vace_reward.train_reward``. Checkpoints and full disks: test_reliability_checkpoint.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config.dgx import get_config
from identity_grpo.configuration import validate_config
from identity_grpo.data import DataError, ReferenceVideoDataset, open_rgb_image
from identity_grpo.rewards import REGISTRY, CombinedReward, RewardInputs, register
from identity_grpo.tracking import append_jsonl
from vace_reward.data import PreferenceDataError, write_video

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "dataset" / "generated_img"
GOOD_ROWS = "ref_paths,prompt\nface.png,a man smiles\n"


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A dataset folder with one good reference and valid train/test CSVs; tests break one thing."""
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (24, 24), (200, 120, 90)).save(root / "face.png")
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text(GOOD_ROWS, encoding="utf-8")
    return root


def tiny_config(tmp_path, dataset_dir, **overrides):
    """The tiny preset, logging under ``tmp_path / "logs"`` (asserted absent after a refusal)."""
    config = get_config("tiny")
    config.pretrained.model = str(tmp_path / "tiny_models" / "wan_vace")  # a place build_tiny may write
    config.dataset = str(dataset_dir)
    config.logdir = str(tmp_path / "logs")
    config.tracker = ""
    config.reward_fn = {"ref_tone": 1.0}
    for name, value in overrides.items():
        section = config
        *parents, leaf = name.split(".")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def refused_by_train(config) -> str:
    """The message ``train(config)`` refuses with; asserts it came before any file was written."""
    import train_wan2_1_vace

    with pytest.raises(ValueError) as error:
        train_wan2_1_vace.train(config)
    assert not Path(config.logdir).exists(), "a refused run must not create its run folder"
    return str(error.value)


# ------------------------------------------------------------------ user data: CSV files


def test_unquoted_comma_in_prompt_is_refused_naming_row_and_how_to_quote(tmp_path, dataset):
    csv_path = dataset / "train.csv"
    csv_path.write_text(GOOD_ROWS + "face.png,a woman, smiling, walks\n", encoding="utf-8")
    message = refused_by_train(tiny_config(tmp_path, dataset))
    assert str(csv_path) in message and "row 3" in message
    assert "4 fields but the header has 2" in message and "double quotes" in message


def test_row_with_fewer_fields_than_header_is_refused(tmp_path, dataset):
    (dataset / "train.csv").write_text("id,prompt,ref_paths\n7,a man smiles\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.csv, row 2, field 'ref_paths': the row has fewer fields"):
        ReferenceVideoDataset(dataset, "train")


def test_csv_that_is_not_utf8_names_file_and_line(tmp_path, dataset):
    csv_path = dataset / "test.csv"
    csv_path.write_bytes("ref_paths,prompt\nface.png,une femme sourit\nface.png,caf\xe9\n".encode("latin-1"))
    message = refused_by_train(tiny_config(tmp_path, dataset))
    assert str(csv_path) in message and "line 3" in message and "UTF-8" in message


def test_oversized_field_names_file_and_row(dataset):
    # An unclosed quote makes the rest of the file one field, past the csv module's limit.
    csv_path = dataset / "train.csv"
    csv_path.write_text(GOOD_ROWS + 'face.png,"a man smiles\n' + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        ReferenceVideoDataset(dataset, "train")
    message = str(error.value)
    assert str(csv_path) in message and "row 3" in message and "unclosed double quote" in message


# ------------------------------------------------------------------ user data: images


def test_16_bit_png_is_scaled_to_8_bit_not_clipped_to_white(tmp_path):
    levels = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)  # 4x4
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")  # what Pillow opens it as
    image = open_rgb_image(tmp_path / "grey16.png")
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]


def test_16_bit_reference_loads_the_same_at_start_up_and_in_training(dataset):
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(dataset / "face16.png")
    (dataset / "train.csv").write_text("ref_paths,prompt\nface16.png,a man smiles\n", encoding="utf-8")
    (image,) = ReferenceVideoDataset(dataset, "train").load_references(0)
    assert image.getpixel((3, 3)) == (100, 100, 100)


@pytest.mark.parametrize("problem, detail", [
    ("float", "32-bit float"),
    ("tiny", "too small to be a reference"),
    ("sliver", "aspect ratio above 200"),
    ("truncated", "cannot be read"),
])
def test_unusable_reference_image_is_refused_naming_file_row_and_field(tmp_path, dataset, problem, detail):
    image_path = dataset / ("bad.tiff" if problem == "float" else "bad.png")
    if problem == "float":
        Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(image_path)
    elif problem == "tiny":
        Image.new("RGB", (2, 2)).save(image_path)
    elif problem == "sliver":
        Image.new("RGB", (4, 1000)).save(image_path)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image_path)
        image_path.write_bytes(image_path.read_bytes()[:-2000])  # the header is intact, the pixels are not
    csv_path = dataset / "test.csv"
    csv_path.write_text(f"ref_paths,prompt\nface.png,a man\n{image_path.name},a woman\n", encoding="utf-8")
    message = refused_by_train(tiny_config(tmp_path, dataset))
    assert f"{csv_path}, row 3, field 'ref_paths'" in message and str(image_path) in message and detail in message


# ------------------------------------------------------------------ impossible settings


@pytest.mark.parametrize("field, value, expected", [
    ("train.learning_rate", 0.0, "train.learning_rate (0.0) must be > 0"),
    ("train.learning_rate", -1e-4, "train.learning_rate (-0.0001) must be > 0"),
    ("train.learning_rate", math.nan, "train.learning_rate is NaN"),
    ("train.learning_rate", math.inf, "train.learning_rate (inf) must be > 0 and finite"),
    ("num_epochs", -1, "num_epochs (-1) must be >= 1"),
    ("save_freq", -1, "save_freq (-1) must be >= 0"),
    ("eval_freq", -2, "eval_freq (-2) must be >= 0"),
    ("num_checkpoint_limit", -1, "num_checkpoint_limit (-1) must be >= 0"),
    ("height", 0, "height (0) must be >= 16"),
    ("frames", -3, "frames (-3) must be >= 1"),
    ("sample.test_batch_size", 0, "sample.test_batch_size (0) must be >= 1"),
    ("sample.noise_level", math.nan, "sample.noise_level is NaN"),
    ("train.adam_beta1", 1.0, "train.adam_beta1 (1.0) must be in [0, 1)"),
    ("train.max_grad_norm", 0.0, "train.max_grad_norm (0.0) must be > 0"),
    ("train.advantage_sign", 0.0, "train.advantage_sign (0.0) must be nonzero"),
    ("train.lora_rank", 0, "train.lora_rank (0) must be >= 1"),
    ("reward_fn", {"ref_tone": 0.0, "ref_similarity": 0}, "every reward_fn weight is 0"),
    ("reward_fn", {"ref_tone": math.inf}, "reward_fn weights must be finite"),
    ("reward_fn", {"ref_tnoe": 1.0}, "unknown reward(s) ['ref_tnoe']; registered:"),
    ("sample.num_steps", 1, "sample.num_steps = 1 leaves the 'identity_grpo' noise schedule without noise"),
])
def test_impossible_setting_names_the_field(field, value, expected):
    config = get_config("tiny")
    if field == "sample.num_steps":
        config.sample.eval_num_steps = value  # eval_sde (tiny preset) needs equal steps
    section, leaf = (config, field) if "." not in field else (config[field.split(".")[0]], field.split(".")[1])
    section[leaf] = value
    with pytest.raises(ValueError, match="invalid config") as error:
        validate_config(config)
    assert expected in str(error.value)


def test_all_impossible_settings_are_listed_at_once():
    config = get_config("tiny")
    config.train.learning_rate, config.num_epochs, config.save_freq = 0.0, -1, -1
    with pytest.raises(ValueError) as error:
        validate_config(config)
    assert all(name in str(error.value) for name in ("train.learning_rate", "num_epochs", "save_freq"))


def test_settings_are_refused_by_train_before_the_run_folder_exists(tmp_path, dataset):
    message = refused_by_train(tiny_config(tmp_path, dataset, **{"train.learning_rate": 0.0}))
    assert "train.learning_rate (0.0) must be > 0" in message


# ------------------------------------------------------------------ model folders, rewards, backends


def test_missing_local_model_path_names_the_field_without_hub_retries(tmp_path, dataset):
    config = tiny_config(tmp_path, dataset, **{"pretrained.model": "./no_such_folder/wan_vace",
                                               "pretrained.build_tiny": False})
    message = refused_by_train(config)
    assert "config.pretrained.model = './no_such_folder/wan_vace' does not exist" in message
    assert "not tried as a hub id" in message


@pytest.mark.parametrize("reachable", [False, True])
def test_uncached_hub_id_with_the_hub_unreachable_names_the_field(tmp_path, dataset, monkeypatch, reachable):
    import identity_grpo.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda endpoint, timeout=5.0: reachable)
    config = tiny_config(tmp_path, dataset, **{"pretrained.model": "some-org/not-cached-model",
                                               "pretrained.build_tiny": False})
    error = models.model_path_error(config, "pretrained.model", config.pretrained.model, "model_index.json")
    if reachable:
        assert error is None  # a hub id the hub can serve is left to from_pretrained
    else:
        assert "config.pretrained.model = 'some-org/not-cached-model'" in error and "cannot be reached" in error


def test_hub_probe_fails_fast_for_an_unresolvable_host():
    from identity_grpo.models import hub_reachable

    assert hub_reachable("https://no-such-host.invalid", timeout=2.0) is False


def test_build_tiny_never_fills_a_mistyped_path_with_random_models(tmp_path, dataset):
    typo = tmp_path / "tiny_modles" / "wan_vace"
    message = refused_by_train(tiny_config(tmp_path, dataset, **{"pretrained.model": str(typo)}))
    assert "config.pretrained.model" in message and "only inside a 'tiny_models/' folder" in message
    assert not typo.parent.exists()


def test_missing_reward_model_folder_is_refused_when_its_reward_is_listed(tmp_path, dataset):
    # Listed at weight 0 it is still loaded and scored (logged), so its folder must exist.
    missing = tmp_path / "no_reward_model"
    config = tiny_config(tmp_path, dataset, reward_fn={"ref_tone": 1.0, "identity": 0.0},
                         **{"pretrained.reward_model": str(missing), "pretrained.build_tiny": False})
    message = refused_by_train(config)
    assert f"config.pretrained.reward_model: '{missing}' does not exist" in message
    # An ensemble's missing member is named, not the members that exist.
    from vace_reward.testing import write_tiny_reward_model

    present = write_tiny_reward_model(tmp_path / "reward_a")
    config.pretrained.reward_model = f"{present},{missing}"
    message = refused_by_train(config)
    assert f"'{missing}' does not exist" in message and f"'{present}'" not in message
    config.reward_fn = {"ref_tone": 1.0}  # not listed: not needed (the base model is still missing here)
    with pytest.raises(ValueError) as error:
        validate_config(config, check_files=True)
    assert "config.pretrained.model" in str(error.value) and "config.pretrained.reward_model" not in str(error.value)


@pytest.mark.parametrize("backend, detail", [("flsh", "is not a diffusers attention backend"),
                                             ("flash", "cannot be used here")])
def test_unusable_attention_backend_is_refused_before_models_load(tmp_path, dataset, backend, detail):
    if backend == "flash":
        try:
            import flash_attn  # noqa: F401

            pytest.skip("flash-attn is installed here, so 'flash' is usable")
        except ImportError:
            pass
    message = refused_by_train(tiny_config(tmp_path, dataset, attention_backend=backend))
    assert f"config.attention_backend = '{backend}'" in message and detail in message


def test_missing_lora_path_is_refused_before_models_load(tmp_path, dataset):
    config = tiny_config(tmp_path, dataset, **{"train.lora_path": str(tmp_path / "no_lora")})
    assert "train.lora_path" in refused_by_train(config)


def test_every_key_a_reward_returns_is_checked_for_nan():
    def fn(inputs):
        batch = inputs.frames.shape[0]
        return {"per_subject": torch.ones(batch), "per_subject/min": torch.tensor([0.5, math.nan])}

    combined = CombinedReward({"per_subject": fn}, {"per_subject": 1.0})
    inputs = RewardInputs(frames=torch.zeros(2, 1, 4, 4, 3, dtype=torch.uint8),
                          reference_images=[[Image.new("RGB", (4, 4))]] * 2, prompts=["a", "b"])
    with pytest.raises(FloatingPointError, match=r"reward 'per_subject' returned NaN/inf in key 'per_subject/min' "
                                                 r"for samples \[1\]"):
        combined(inputs)


def test_metrics_jsonl_is_valid_json_with_null_for_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 0, "reward/identity": math.nan, "reward/std": math.inf, "nested": [1.0, -math.inf]})
    append_jsonl(path, {"epoch": 1, "reward/identity": 0.5})
    lines = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
             for line in path.read_text().splitlines()]
    assert lines == [{"epoch": 0, "reward/identity": None, "reward/std": None, "nested": [1.0, None]},
                     {"epoch": 1, "reward/identity": 0.5}]


# ------------------------------------------------------------------ a run whose reward never varies


if "constant_for_tests" not in REGISTRY:
    @register("constant_for_tests")
    def _constant_reward(config, device):
        return lambda inputs: {"constant_for_tests": torch.full((inputs.frames.shape[0],), 0.25)}


def test_epochs_with_only_zero_advantages_are_warned_about_and_summarised(tmp_path, tiny_vace_dir, caplog):
    import train_wan2_1_vace

    config = tiny_config(tmp_path, DATASET, reward_fn={"constant_for_tests": 1.0}, num_epochs=1, eval_freq=0,
                         log_videos_freq=0, **{"pretrained.model": str(tiny_vace_dir),
                                               "sample.train_batch_size": 4, "sample.num_image_per_prompt": 2,
                                               "sample.test_batch_size": 4})
    with caplog.at_level("WARNING"):
        summary = train_wan2_1_vace.train(config)
    assert summary["zero_advantage_epochs"] == [0]
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["zero_advantage_epochs"] == [0]
    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["reward/zero_advantage_fraction"] == 1.0
    assert "EVERY ADVANTAGE IS 0" in caplog.text


# ------------------------------------------------------------------ python -m vace_reward.inference


def _score_cli(*args: str) -> str:
    from vace_reward.inference import main

    with pytest.raises(SystemExit) as error:
        main(list(args))
    return str(error.value)


def test_reward_cli_checks_the_csv_before_loading_the_model(tmp_path):
    # The model folder does not exist: an error about the CSV proves the CSV was read first.
    Image.new("RGB", (24, 24)).save(tmp_path / "ref.png")
    write_video(tmp_path / "good.mp4", torch.zeros(5, 32, 32, 3, dtype=torch.uint8))
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    cases = {
        "extra_fields.csv": ("ref_paths,video,prompt\nref.png,good.mp4,a man, smiling\n", "row 2: 4 fields"),
        "corrupt_video.csv": ("ref_paths,video,prompt\nref.png,good.mp4,ok\nref.png,corrupt.mp4,bad\n",
                              "row 3, field 'video': video"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        message = _score_cli("--model", str(tmp_path / "no_model"), "--csv", str(tmp_path / name), "--device", "cpu")
        assert str(tmp_path / name) in message and expected in message
        assert not (tmp_path / name.replace(".csv", "_scores.csv")).exists()
    (tmp_path / "latin1.csv").write_bytes("ref_paths,video,prompt\nref.png,good.mp4,caf\xe9\n".encode("latin-1"))
    message = _score_cli("--model", str(tmp_path / "no_model"), "--csv", str(tmp_path / "latin1.csv"))
    assert "latin1.csv, line 2: not UTF-8" in message


def test_reward_cli_checks_single_video_inputs_before_loading_the_model(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video")
    Image.new("RGB", (24, 24)).save(tmp_path / "ref.png")
    message = _score_cli("--model", str(tmp_path / "no_model"), "--refs", str(tmp_path / "ref.png"),
                         "--video", str(tmp_path / "corrupt.mp4"))
    assert "--video: video" in message and "corrupt.mp4 cannot be decoded" in message


# ------------------------------------------------------------------ python -m vace_reward.train_reward


def _pairs(folder: Path, video_b: str = "b.mp4") -> Path:
    Image.new("RGB", (24, 24), (200, 120, 90)).save(folder / "ref.png")
    for name in ("a.mp4", "b.mp4"):
        write_video(folder / name, torch.zeros(5, 32, 32, 3, dtype=torch.uint8))
    (folder / "init").mkdir()
    (folder / "init" / "reward_config.json").write_text("{}")  # enough for the flag check; never loaded here
    csv_path = folder / "pairs.csv"
    csv_path.write_text(f"ref_paths,prompt,video_a,video_b,label\nref.png,p,a.mp4,b.mp4,A\nref.png,p,a.mp4,{video_b},B\n")
    return csv_path


def test_reward_training_decodes_every_video_header_before_the_model_loads(tmp_path):
    from vace_reward.train_reward import main

    (tmp_path / "truncated.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    csv_path = _pairs(tmp_path, video_b="truncated.mp4")
    with pytest.raises(PreferenceDataError) as error:
        main(["--train-csv", str(csv_path), "--init", str(tmp_path / "init"), "--output-dir", str(tmp_path / "run")])
    message = str(error.value)
    assert f"{csv_path}, row 3, field 'video_b'" in message and "truncated.mp4 cannot be decoded" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--learning-rate", "0"], "--learning-rate must be a finite number > 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0"),
    (["--num-epochs", "0"], "--num-epochs must be >= 1"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--init", "no_such_reward_model"], "--init 'no_such_reward_model' does not exist"),
])
def test_reward_training_refuses_impossible_options_before_writing(tmp_path, flags, expected):
    from vace_reward.train_reward import main

    csv_path = _pairs(tmp_path)
    with pytest.raises(ValueError) as error:
        main(["--train-csv", str(csv_path), "--init", str(tmp_path / "init"), "--output-dir", str(tmp_path / "run"),
              *flags])
    assert expected in str(error.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ test_wan2_1_vace.py

# The batch inference script defines the same absl flag as the train script, so it runs in its own
# interpreter: each case calls run_inference (patched where a late failure is simulated) and
# reports the error and the folders left under logdir.
DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import test_wan2_1_vace as script
from config.dgx import get_config

def config_for(case, logdir):
    config = get_config("tiny")
    config.pretrained.model = {models!r}
    config.dataset = {dataset!r}
    config.logdir = str(logdir)
    config.reward_fn = {{"ref_tone": 1.0}}
    config.sample.eval_sde, config.sample.eval_num_steps = False, 2
    if case == "bad_csv":
        config.dataset = {bad_dataset!r}
    if case == "missing_lora":
        config.train.lora_path = str(logdir.parent / "no_lora")
    return config

def fail_late(write_video_first):
    def generate_variant(name, pipeline, dataset, reward_fn, scorer, opens2v, config, accelerator, out_dir, variant_dir,
                         refs):
        if write_video_first:
            (variant_dir / "videos").mkdir(parents=True, exist_ok=True)
            (variant_dir / "videos" / "00000.mp4").write_bytes(b"a finished video")
        raise RuntimeError("simulated late failure")
    return generate_variant

results = {{}}
for case in ("bad_csv", "missing_lora", "late_no_video", "late_after_video"):
    logdir = Path({tmp!r}) / case / "logs"
    if case.startswith("late"):
        script.generate_variant = fail_late(case == "late_after_video")
    try:
        script.run_inference(config_for(case, logdir))
        error = None
    except Exception as exception:
        error = str(exception)
    folders = sorted(str(p) for p in logdir.glob("*")) if logdir.exists() else []
    notes = [str(p) for p in logdir.glob("*/INCOMPLETE.txt")] if logdir.exists() else []
    results[case] = {{"error": error, "folders": folders, "notes": notes}}
print("RESULTS " + json.dumps(results))
"""


def test_inference_script_refuses_bad_input_before_its_output_folder_and_cleans_up_late_failures(
        tmp_path, tiny_vace_dir):
    bad = tmp_path / "bad_data"
    bad.mkdir()
    Image.new("RGB", (24, 24)).save(bad / "face.png")
    (bad / "test.csv").write_text("ref_paths,prompt\nface.png,a man, smiling\n")
    driver = DRIVER.format(root=str(ROOT), models=str(tiny_vace_dir), dataset=str(DATASET), bad_dataset=str(bad),
                           tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS "):])

    assert f"{bad / 'test.csv'}, row 2" in results["bad_csv"]["error"] and results["bad_csv"]["folders"] == []
    assert "train.lora_path" in results["missing_lora"]["error"] and results["missing_lora"]["folders"] == []
    # A failure before any video: the output folder is removed.
    assert results["late_no_video"]["error"] == "simulated late failure"
    assert results["late_no_video"]["folders"] == []
    # After a video: the folder stays, with its video, marked incomplete.
    assert results["late_after_video"]["error"] == "simulated late failure"
    (folder,) = results["late_after_video"]["folders"]
    assert results["late_after_video"]["notes"] == [str(Path(folder) / "INCOMPLETE.txt")]
    assert (Path(folder) / "videos" / "00000.mp4").is_file()
