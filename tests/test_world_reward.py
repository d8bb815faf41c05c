"""The tiny world's preference pairs and its reward model: labels checked with the world's own
identity classifier, the written data set read back by the reward trainer's reader, and a short
training run of the real entry point whose loss falls."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from identity_grpo.world.identity import identity_score
from identity_grpo.world.preferences import (
    DRAWN_KINDS,
    GENERATED_KINDS,
    HELD_OUT_IDENTITIES,
    SWAP_KINDS,
    TIE_KINDS,
    distort_face,
    face_box,
    make_pair,
    read_kinds,
    rotate_hue,
    split_identities,
    swap_candidates,
    world_pairs,
    write_preference_set,
)
from identity_grpo.world.render import IDENTITY_BY_NAME, Scene, render_video

# A folder holding a built world reward model (python -m identity_grpo.world.reward OUT_DIR);
# the held-out accuracy test runs only when it is set.
WORLD_REWARD_ENV = "IDENTITY_GRPO_WORLD_REWARD"


def _scene(*names: str) -> Scene:
    people = tuple(IDENTITY_BY_NAME[name] for name in names)
    x0 = (0.3, 0.64)[:len(people)]
    return Scene(people, "in the park", "still", x0, 0.5)


# ---------------------------------------------------------------------- edits by hand

def test_rotate_hue_hand_values():
    # Pure red a third of the way round the wheel is pure green, two thirds pure blue; a grey
    # (no saturation) has no hue to rotate.
    pixels = np.array([[[255, 0, 0], [120, 120, 120]]], dtype=np.uint8)
    np.testing.assert_array_equal(rotate_hue(pixels, 1 / 3), [[[0, 255, 0], [120, 120, 120]]])
    np.testing.assert_array_equal(rotate_hue(pixels, 2 / 3), [[[0, 0, 255], [120, 120, 120]]])


def test_swap_candidates_differ_as_named():
    person = IDENTITY_BY_NAME["tan_blond_short"]
    everyone = list(IDENTITY_BY_NAME.values())
    # 3 skins x 4 hair colours per style: 2 other skins, 3 other hair colours, 2 x 3 of both.
    assert sorted(i.name for i in swap_candidates(person, "swap_skin", everyone)) == ["dark_blond_short", "pale_blond_short"]
    assert sorted(i.name for i in swap_candidates(person, "swap_hair", everyone)) == [
        "tan_black_short", "tan_red_short", "tan_white_short"]
    both = swap_candidates(person, "swap_both", everyone)
    assert len(both) == 6 and all(i.skin != "tan" and i.hair != "blond" and i.style == "short" for i in both)


def test_distortions_touch_only_the_face_box():
    scene = _scene("pale_blond_long", "dark_black_short")
    video = render_video(scene, 32, 5)
    for kind in ("hue", "blur"):
        distorted = distort_face(video, scene, slot=1, kind=kind)
        inside = np.zeros(video.shape[:3], dtype=bool)
        for frame_index in range(5):
            x0, y0, x1, y1 = face_box(scene, 1, frame_index, 32, 5)
            inside[frame_index, y0:y1, x0:x1] = True
        changed = (distorted != video).any(axis=-1)
        assert not changed[~inside].any(), kind
        assert changed[inside].mean() > 0.2, kind  # a real change of the face, not a few pixels
    with pytest.raises(ValueError, match="unknown distortion"):
        distort_face(video, scene, 0, "sharpen")


# ---------------------------------------------------------------------- pair labels

@pytest.mark.parametrize("kind", SWAP_KINDS)
def test_swapped_video_shows_another_identity(kind):
    # The world's classifier finds every reference in the preferred video, misses the replaced
    # person in the rejected one, and finds the swap-in there instead.
    _, everyone = split_identities()
    rng = np.random.default_rng(3)
    for scene in (_scene("pale_red_long"), _scene("tan_white_short", "dark_blond_long")):
        pair = make_pair(kind, scene, rng, everyone, 32, 5)
        assert pair.label in ("A", "B")
        preferred, rejected = (pair.video_a, pair.video_b) if pair.label == "A" else (pair.video_b, pair.video_a)
        shown = pair.shown_b if pair.label == "A" else pair.shown_a
        assert identity_score(preferred, list(pair.references)) == 1.0
        assert identity_score(rejected, list(pair.references)) < 1.0
        assert identity_score(rejected, list(shown)) == 1.0
        (slot,) = [index for index, (a, b) in enumerate(zip(pair.references, shown)) if a != b]
        old, new = pair.references[slot], shown[slot]
        assert old.style == new.style
        assert (old.skin != new.skin, old.hair != new.hair) == {
            "swap_skin": (True, False), "swap_hair": (False, True), "swap_both": (True, True)}[kind]


def test_pairs_cycle_kinds_and_ties_are_labelled_tie():
    _, everyone = split_identities()
    pairs = world_pairs(2 * len(DRAWN_KINDS), seed=7, identities=everyone)
    assert [pair.kind for pair in pairs] == list(DRAWN_KINDS) * 2
    for pair in pairs:
        assert (pair.label == "tie") == (pair.kind in TIE_KINDS)
        if pair.kind == "tie_same_people":
            assert pair.shown_a == pair.shown_b == pair.references
            assert not np.array_equal(pair.video_a, pair.video_b)
        if pair.kind == "tie_both_swapped":
            assert pair.shown_a != pair.shown_b and pair.references not in (pair.shown_a, pair.shown_b)
    # Which side holds the preferred video is a coin flip, not always A.
    assert {pair.label for pair in pairs if pair.kind not in TIE_KINDS} == {"A", "B"}
    # Seeded: the same seed draws the same pairs.
    again = world_pairs(len(DRAWN_KINDS), seed=7, identities=everyone)
    for first, second in zip(pairs, again):
        assert first.label == second.label and np.array_equal(first.video_b, second.video_b)


def test_written_set_reads_back_and_holds_identities_out(tmp_path):
    from vace_reward.data import read_preference_csv, read_video

    paths = write_preference_set(tmp_path / "pairs", num_train=2 * len(DRAWN_KINDS), num_eval=len(DRAWN_KINDS), seed=1)
    train, held_out = read_preference_csv(paths.train_csv), read_preference_csv(paths.eval_csv)
    assert len(train) == 2 * len(DRAWN_KINDS) and len(held_out) == len(DRAWN_KINDS)
    assert read_kinds(paths.train_csv) == list(DRAWN_KINDS) * 2
    for pair in train:
        assert not {ref.stem for ref in pair.reference_paths} & set(HELD_OUT_IDENTITIES)
        assert all(ref.stem in IDENTITY_BY_NAME and ref.suffix == ".png" for ref in pair.reference_paths)
    train_videos = {pair.video_a.name for pair in train} | {pair.video_b.name for pair in train}
    assert not train_videos & ({pair.video_a.name for pair in held_out} | {pair.video_b.name for pair in held_out})
    # Videos are lossless at the reward model's 10 fps: the file decodes to the rendered frames.
    expected = world_pairs(1, seed=2, identities=split_identities()[0])[0]
    frames, fps = read_video(train[0].video_a)
    assert fps == pytest.approx(10.0)
    np.testing.assert_array_equal(frames.numpy(), expected.video_a)
    with open(paths.train_csv, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["ref_paths", "prompt", "video_a", "video_b", "label", "kind"]


def test_unknown_kind_names_file_row_and_field(tmp_path):
    from vace_reward.data import PreferenceDataError

    path = tmp_path / "pairs.csv"
    path.write_text("ref_paths,prompt,video_a,video_b,label,kind\nr.png,p,a.mp4,b.mp4,A,swap_skin\n"
                    "r.png,p,a.mp4,b.mp4,A,swap_eyes\n")
    with pytest.raises(PreferenceDataError, match=r"pairs.csv, row 3, field 'kind'"):
        read_kinds(path)


# ---------------------------------------------------------------------- the generator's own pairs
WORLD_GENERATOR = Path(__file__).resolve().parents[1] / "dataset" / "tiny_world" / "models" / "wan_vace"


def test_generated_pairs_are_labelled_by_the_identity_check():
    """Pairs of the committed generator's SDE samples: the preferred video is the one the soft
    identity check scores higher against the references, by at least the margin; in swap pairs
    that is mostly the video generated from the true references (the generator follows them);
    the same seed gives the same pairs."""
    from identity_grpo.rewards.world import SOFT_TEMPERATURE
    from identity_grpo.world.generated_pairs import generated_pairs, load_world_pipeline

    pipeline = load_world_pipeline(WORLD_GENERATOR)
    pairs = generated_pairs(pipeline, 64, seed=3, margin=0.05)
    assert len(pairs) > 40 and {pair.kind for pair in pairs} == set(GENERATED_KINDS)
    for pair in pairs:
        score_a, score_b = (identity_score(video, list(pair.references), SOFT_TEMPERATURE)
                            for video in (pair.video_a, pair.video_b))
        assert abs(score_a - score_b) >= 0.05 and pair.label == ("A" if score_a > score_b else "B")
        if pair.kind == "generated_same":
            assert pair.shown_a == pair.shown_b == pair.references
    swaps = [pair for pair in pairs if pair.kind == "generated_swap"]
    true_side_preferred = [(pair.shown_a if pair.label == "A" else pair.shown_b) == pair.references for pair in swaps]
    assert np.mean(true_side_preferred) > 0.75, np.mean(true_side_preferred)
    small = generated_pairs(pipeline, 8, seed=5, batch_size=4)
    again = generated_pairs(pipeline, 8, seed=5, batch_size=4)
    assert [(p.kind, p.label, p.prompt) for p in small] == [(p.kind, p.label, p.prompt) for p in again]
    assert all(np.array_equal(p.video_a, q.video_a) for p, q in zip(small, again))
    # Four samples a scene: up to six same-reference pairs each (every two of them), each labelled
    # by the check; the swap pair per scene stays one.
    four = generated_pairs(pipeline, 8, seed=5, batch_size=4, samples_per_scene=4)
    same = [pair for pair in four if pair.kind == "generated_same"]
    assert sum(pair.kind == "generated_same" for pair in small) < len(same) <= 6 * 8
    assert sum(pair.kind == "generated_swap" for pair in four) <= 8
    for pair in same:
        score_a, score_b = (identity_score(video, list(pair.references), SOFT_TEMPERATURE)
                            for video in (pair.video_a, pair.video_b))
        assert abs(score_a - score_b) >= 0.05 and pair.label == ("A" if score_a > score_b else "B")
    with pytest.raises(ValueError, match="samples_per_scene must be at least 2"):
        generated_pairs(pipeline, 4, seed=5, samples_per_scene=1)


def test_generated_pairs_join_the_drawn_ones_in_the_trainers_format(tmp_path):
    from identity_grpo.world.reward import WorldRewardSettings, add_generated_pairs, concatenate_csvs
    from vace_reward.data import read_preference_csv

    settings = WorldRewardSettings(num_generated_train_scenes=6, num_generated_eval_scenes=4)
    paths = write_preference_set(tmp_path, num_train=7, num_eval=7, seed=1)
    generated_train, _ = add_generated_pairs(tmp_path, WORLD_GENERATOR, settings)
    joined = concatenate_csvs(tmp_path / "all.csv", paths.train_csv, generated_train)
    kinds = read_kinds(joined)
    assert kinds[:7] == list(DRAWN_KINDS) and set(kinds[7:]) <= set(GENERATED_KINDS) and len(kinds) > 7
    pairs = read_preference_csv(joined)  # the reward trainer's own reader resolves every path
    assert len(pairs) == len(kinds) and all(pair.video_a.is_file() and pair.video_b.is_file() for pair in pairs[7:])


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("caption_steps", [0, 3])
def test_build_trains_through_the_entry_point_and_loss_falls(tmp_path, caption_steps):
    # A memorisable set (the first 10 decisive pairs; ties are filtered out by train_kinds), one
    # full batch a step: the real build path (preference set -> random model [-> captioning] ->
    # train_reward -> held-out evaluation -> out_dir) runs, its training loss falls, and the
    # folder it leaves scores videos with the instruction it was trained with.
    import json

    from identity_grpo.world.reward import (
        SUMMARY_NAME,
        WORLD_INSTRUCTION,
        WorldRewardSettings,
        build_world_reward_model,
    )
    from vace_reward.model import IdentityRewardModel

    settings = WorldRewardSettings(num_train_pairs=14, num_eval_pairs=7, batch_size=10, num_epochs=8,
                                   learning_rate=3e-3, head_learning_rate=3e-3, vision_learning_rate=3e-3,
                                   caption_steps=caption_steps)
    out_dir = tmp_path / "world_reward"
    summary = build_world_reward_model(out_dir, seed=0, settings=settings)
    losses = [json.loads(line)["train/loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in json.loads(line)]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    saved = json.loads((out_dir / SUMMARY_NAME).read_text())
    assert saved["held_out"]["num_pairs"] == 7 and saved["settings"]["loss"] == "bt"
    # The captioning's record: a loss at the start and one after its single window of 3 steps.
    assert ("captioning" in saved) == bool(caption_steps)
    if caption_steps:
        assert len(saved["captioning"]["losses"]) == 2
        assert set(saved["captioning"]["held_out_attribute_accuracy"]) == {"picture", "video"}
    assert set(summary["held_out"]) >= {"swap/accuracy", "distortion/accuracy", "tie/accuracy"}
    model, _ = IdentityRewardModel.from_pretrained(out_dir)
    assert model.config.instruction == WORLD_INSTRUCTION and model.config.num_frames == settings.num_frames


# Held-out accuracy on pairs of two samples of the same references that each shipped model
# exceeds (0.62-0.70 measured for the recipe, seeds 0-3; the earlier recipes' 0.58-0.60 did not
# teach GRPO identity reliably; docs/tiny_world.md).
SAME_MIN = 0.6


def test_tiny_world_preset_trains_the_mean_of_the_worlds_shipped_reward_models():
    """The preset (and its Phantom twin) trains ``identity`` alone, the mean of the folders the build writes, each
    shipped, trained with the build's recipe (captioning, four samples a scene) and ranking
    held-out pairs of two of the generator's samples of the same references (what a GRPO group
    compares) better than chance by a margin."""
    from config.dgx import get_config
    from identity_grpo.rewards import reward_model_folders
    from identity_grpo.world.reward import REWARD_ENSEMBLE_SEEDS, WorldRewardSettings, reward_model_folder

    config = get_config("tiny_world")
    assert {name for name, weight in config.reward_fn.items() if weight} == {"identity"}
    phantom = get_config("tiny_world_phantom")  # the same reward on the Phantom generator
    assert (phantom.reward_fn, phantom.pretrained.reward_model) == (config.reward_fn, config.pretrained.reward_model)
    folders = reward_model_folders(config.pretrained.reward_model)
    assert folders == [f"dataset/tiny_world/models/{reward_model_folder(seed)}" for seed in REWARD_ENSEMBLE_SEEDS]
    root = Path(__file__).resolve().parents[1]
    recipe = dataclasses.asdict(WorldRewardSettings())
    for seed, folder in zip(REWARD_ENSEMBLE_SEEDS, folders):
        summary = json.loads((root / folder / "world_reward.json").read_text())
        assert (root / folder / "reward_config.json").is_file()
        assert summary["settings"] == json.loads(json.dumps({**recipe, "seed": seed}))
        assert summary["held_out"]["generated_same/accuracy"] > SAME_MIN, (folder, summary["held_out"])
