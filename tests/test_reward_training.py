"""Preference losses against hand-computed values, data validation, LoRA merging, learnability."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from vace_reward.data import PreferenceDataError, PreferencePair, read_preference_csv, write_preference_csv, write_video
from vace_reward.inference import IdentityRewardScorer
from vace_reward.losses import bradley_terry_loss, bradley_terry_ties_loss, pairwise_accuracy, preference_loss
from vace_reward.model import IdentityRewardModel
from vace_reward.testing import build_tiny_reward_model
from vace_reward.train_reward import TrainRewardConfig, add_lora, merged_backbone_state_dict, parse_args, train


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------- losses

def test_bradley_terry_loss_masks_ties_as_videoalign():
    # d = log 3 -> P(A) = 3/4: "A" costs -log 3/4, "B" costs -log 1/4. VideoAlign's "bt" gives a tie 0 loss
    # but keeps it in the mean's denominator: (-log 3/4 - log 1/4 + 0 + log 2) / 4.
    d = math.log(3.0)
    reward_a, reward_b = torch.tensor([d, d, d, 0.0]), torch.zeros(4)
    per_pair = [-math.log(0.75), -math.log(0.25), 0.0, math.log(2.0)]
    for index, target in enumerate([1.0, 0.0, 0.5, 1.0]):
        loss = bradley_terry_loss(reward_a[index:index + 1], reward_b[index:index + 1], torch.tensor([target]))
        assert loss.item() == pytest.approx(per_pair[index], abs=1e-6)
    batch = bradley_terry_loss(reward_a, reward_b, torch.tensor([1.0, 0.0, 0.5, 1.0]))
    assert batch.item() == pytest.approx(sum(per_pair) / 4, abs=1e-6)
    # A tie contributes no gradient at all (the soft label would pull d towards 0).
    reward_a = torch.tensor([d, 0.7], requires_grad=True)
    bradley_terry_loss(reward_a, torch.zeros(2), torch.tensor([1.0, 0.5])).backward()
    assert reward_a.grad[1].item() == 0.0 and reward_a.grad[0].item() == pytest.approx(-0.25 / 2, abs=1e-6)


def test_soft_bradley_terry_loss_hand_values():
    # The soft-label variant ("bt_soft"): a tie costs the mean of both outcomes.
    d = math.log(3.0)
    reward_a, reward_b = torch.tensor([d, d, d, 0.0]), torch.zeros(4)
    per_pair = [-math.log(0.75), -math.log(0.25), 0.5 * (-math.log(0.75) - math.log(0.25)), math.log(2.0)]
    batch = preference_loss("bt_soft", reward_a, reward_b, torch.tensor([1.0, 0.0, 0.5, 1.0]))
    assert batch.item() == pytest.approx(sum(per_pair) / 4, abs=1e-6)


def test_bradley_terry_ties_loss_hand_values():
    # theta = e (log theta = 1), d = 1: P(A) = sigmoid(0) = 1/2, P(B) = sigmoid(-2) = 1 / (1 + e^2),
    # P(tie) = 1 - P(A) - P(B) = (e^2 - 1) P(A) P(B).
    theta, d = math.e, 1.0
    p_a, p_b = 0.5, 1.0 / (1.0 + math.e**2)
    p_tie = 1.0 - p_a - p_b
    assert p_tie == pytest.approx((math.e**2 - 1) * p_a * p_b)
    reward_a, reward_b = torch.tensor([d]), torch.tensor([0.0])
    for target, probability in [(1.0, p_a), (0.0, p_b), (0.5, p_tie)]:
        loss = bradley_terry_ties_loss(reward_a, reward_b, torch.tensor([target]), theta=theta)
        assert loss.item() == pytest.approx(-math.log(probability), abs=1e-6)
    # Swapping A and B swaps the "A" and "B" losses; the tie loss is symmetric.
    swapped = bradley_terry_ties_loss(reward_b, reward_a, torch.tensor([0.0]), theta=theta)
    assert swapped.item() == pytest.approx(-math.log(p_a), abs=1e-6)
    # Far from d = 0 (d = 40) the tie log-probability stays finite: log(e^2 - 1) - 39 - 41 (approx).
    far = bradley_terry_ties_loss(torch.tensor([40.0]), torch.tensor([0.0]), torch.tensor([0.5]), theta=theta)
    assert far.item() == pytest.approx(-(math.log(math.e**2 - 1) - 41.0 + math.log(sigmoid(39.0))), rel=1e-5)


def test_ties_loss_rejects_bad_targets_and_theta():
    with pytest.raises(ValueError, match="targets"):
        bradley_terry_ties_loss(torch.zeros(1), torch.zeros(1), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="theta"):
        bradley_terry_ties_loss(torch.zeros(1), torch.zeros(1), torch.tensor([1.0]), theta=1.0)


def test_pairwise_accuracy_counts_ties():
    # theta = e: at d = 0, P(tie) = (e^2 - 1) sigmoid(-1)^2 = 0.462 > P(A) = P(B) = 0.269 -> tie.
    # At d = 3: P(A) = sigmoid(2) = 0.881 -> A. At d = -3 -> B.
    reward_a = torch.tensor([3.0, 3.0, 0.0, -3.0, 0.0])
    reward_b = torch.zeros(5)
    target = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0])
    #                      right wrong right right wrong(predicted tie)
    metrics = pairwise_accuracy(reward_a, reward_b, target, theta=math.e)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["accuracy_decisive"] == pytest.approx(2 / 4)
    assert metrics["num_ties"] == 1
    # Without a tie model (theta = 1) a tie is never predicted: the labelled tie is wrong, and at
    # d = 0 the equal P(A) = P(B) resolve to A, so row 4 becomes right. Rows 0, 3, 4 are right.
    plain = pairwise_accuracy(reward_a, reward_b, target, theta=1.0)
    assert plain["accuracy"] == pytest.approx(3 / 5)
    assert plain["accuracy_decisive"] == pytest.approx(3 / 4)


# ---------------------------------------------------------------------- data validation

def _media(folder):
    generator = torch.Generator().manual_seed(0)
    write_video(folder / "a.mp4", torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=generator))
    write_video(folder / "b.mp4", torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=generator))
    Image.new("RGB", (24, 24), (200, 120, 90)).save(folder / "ref.png")


@pytest.mark.parametrize("row, field", [
    ("ref.png,p,a.mp4,b.mp4,C", "label"),
    (",p,a.mp4,b.mp4,A", "ref_paths"),
    ("ref.png;ref.png;ref.png;ref.png;ref.png,p,a.mp4,b.mp4,A", "ref_paths"),
    ("missing.png,p,a.mp4,b.mp4,A", "ref_paths"),
    ("ref.png,p,a.mp4,missing.mp4,tie", "video_b"),
])
def test_preference_csv_errors_name_row_and_field(tmp_path, row, field):
    _media(tmp_path)
    (tmp_path / "pairs.csv").write_text(f"ref_paths,prompt,video_a,video_b,label\nref.png,p,a.mp4,b.mp4,A\n{row}\n")
    with pytest.raises(PreferenceDataError, match=rf"pairs.csv, row 3, field '{field}'"):
        read_preference_csv(tmp_path / "pairs.csv")


def test_preference_csv_round_trip(tmp_path):
    _media(tmp_path)
    pairs = [PreferencePair((tmp_path / "ref.png",), "two people", tmp_path / "a.mp4", tmp_path / "b.mp4", target)
             for target in (1.0, 0.0, 0.5)]
    write_preference_csv(tmp_path / "pairs.csv", pairs)
    assert "ref.png,two people,a.mp4,b.mp4,tie" in (tmp_path / "pairs.csv").read_text()
    read = read_preference_csv(tmp_path / "pairs.csv")
    assert [p.target for p in read] == [1.0, 0.0, 0.5]
    assert read[0].video_a.resolve() == (tmp_path / "a.mp4").resolve()


# ---------------------------------------------------------------------- LoRA merge

def test_merged_state_dict_scores_like_the_adapted_model(tmp_path):
    model, processor = build_tiny_reward_model(seed=1)
    add_lora(model, TrainRewardConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA weights, so the merge matters
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.eval()
    model.save_pretrained(tmp_path / "merged", processor=processor,
                          backbone_state_dict=merged_backbone_state_dict(model.backbone))
    merged, merged_processor = IdentityRewardModel.from_pretrained(tmp_path / "merged")
    frames = torch.randint(0, 256, (2, 5, 32, 32, 3), dtype=torch.uint8, generator=generator)
    refs = [[Image.new("RGB", (30, 40), (10, 200, 30))], [Image.new("RGB", (40, 30), (200, 10, 30))]]
    adapted = IdentityRewardScorer(model, processor).score_frames(frames, refs, ["a", "b"])
    reloaded = IdentityRewardScorer(merged, merged_processor).score_frames(frames, refs, ["a", "b"])
    torch.testing.assert_close(adapted, reloaded, atol=1e-5, rtol=1e-5)
    assert not any("lora" in key for key in merged.state_dict())


# ---------------------------------------------------------------------- learnability

def _synthetic_preferences(folder, num_pairs: int, seed: int) -> list[PreferencePair]:
    """Clean vs heavily noised versions of smooth videos; the label says which one is A.

    The clean video (one colour + a soft blob, like a face on a background) is preferred; which
    of A and B holds it is random, so position alone carries no signal.
    """
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    pairs = []
    for index in range(num_pairs):
        colour = torch.rand(3, generator=generator) * 200 + 30
        centre = torch.rand(2, generator=generator) - 0.5
        blob = torch.exp(-((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) * 6)[..., None]  # (32, 32, 1)
        frame = colour * (0.5 + 0.5 * blob)
        clean = frame.expand(5, 32, 32, 3).clone()
        noisy = clean + torch.randn(clean.shape, generator=generator) * 90
        clean, noisy = (video.clamp(0, 255).to(torch.uint8) for video in (clean, noisy))
        Image.fromarray(clean[0].numpy()).save(folder / f"ref{index}.png")
        clean_first = bool(torch.rand(1, generator=generator) < 0.5)
        first, second = (clean, noisy) if clean_first else (noisy, clean)
        pairs.append(PreferencePair(
            (folder / f"ref{index}.png",), "a person",
            write_video(folder / f"{index}_a.mp4", first, lossless=True),
            write_video(folder / f"{index}_b.mp4", second, lossless=True),
            1.0 if clean_first else 0.0,
        ))
    return pairs


def test_training_learns_a_synthetic_preference(tmp_path):
    # A short instruction keeps sequences at ~60 tokens instead of ~860 (the long default text
    # costs only time here; learnability does not depend on it).
    model, processor = build_tiny_reward_model(seed=0)
    model.config = dataclasses.replace(model.config, instruction="Rate the face match: <|SA_reward|>")
    init = tmp_path / "init"
    model.save_pretrained(init, processor=processor)
    train_csv = write_preference_csv(tmp_path / "train" / "pairs.csv", _synthetic_preferences(tmp_path / "train", 16, seed=0))
    eval_csv = write_preference_csv(tmp_path / "eval" / "pairs.csv", _synthetic_preferences(tmp_path / "eval", 16, seed=1))
    config = parse_args([
        "--train-csv", str(train_csv), "--eval-csv", str(eval_csv), "--init", str(init),
        "--output-dir", str(tmp_path / "run"), "--loss", "btt", "--tie-theta", "2.0",
        "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.0",
        "--learning-rate", "3e-3", "--head-learning-rate", "3e-2",
        "--batch-size", "4", "--gradient-accumulation-steps", "1", "--num-epochs", "3", "--save-every", "1000",
        "--seed", "0",
    ])
    final = train(config)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before = history[0]["eval/accuracy"]
    assert final["eval/accuracy"] >= 0.9, history  # 15 of 16 held-out pairs or better; chance is 0.5
    assert final["eval/accuracy"] > before
    assert final["eval/loss"] < history[0]["eval/loss"]
    # The saved final model (LoRA merged, standard layout) reproduces the trained ranking.
    scorer = IdentityRewardScorer.from_pretrained(tmp_path / "run" / "final")
    pairs = read_preference_csv(eval_csv)
    reward_a = scorer.score_videos([p.video_a for p in pairs], [p.reference_paths for p in pairs], [p.prompt for p in pairs])
    reward_b = scorer.score_videos([p.video_b for p in pairs], [p.reference_paths for p in pairs], [p.prompt for p in pairs])
    target = torch.tensor([p.target for p in pairs])
    reloaded = pairwise_accuracy(reward_a[:, 0], reward_b[:, 0], target, theta=2.0)
    assert reloaded["accuracy"] == pytest.approx(final["eval/accuracy"])
