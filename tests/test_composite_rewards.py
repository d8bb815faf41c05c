"""Composite rewards with stub scorers and hand-computed numbers: ID-Crafter's face + quality reward,
EvoID's rule judge and blended group weights, and reward- vs advantage-level combination."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from identity_grpo.advantages import group_advantages, weighted_group_advantages
from identity_grpo.rewards import REGISTRY, CombinedReward, RewardInputs, build_reward_fn, register
from identity_grpo.rewards.composite import (
    Combination,
    blend_weights,
    epoch_advantages,
    face_fidelity,
    idcrafter_key_weights,
    normalise_score,
    rule_batch_weights,
)

FACE, AES, NAT = "_stub_face", "_stub_aes", "_stub_nat"
# Two videos. Face: per-subject mean [0.8, 0.6], worst subject [0.6, 0.2]. Quality: aesthetic
# [0.5, 0.9], naturalness [0.7, 0.3].
STUB = {FACE: [0.8, 0.6], f"{FACE}/min": [0.6, 0.2], AES: [0.5, 0.9], NAT: [0.7, 0.3]}


@pytest.fixture
def stub_rewards():
    @register(FACE)
    def face(config, device):
        return lambda inputs: {FACE: torch.tensor(STUB[FACE]), f"{FACE}/min": torch.tensor(STUB[f"{FACE}/min"])}

    @register(AES)
    def aes(config, device):
        return lambda inputs: {AES: torch.tensor(STUB[AES])}

    @register(NAT)
    def nat(config, device):
        return lambda inputs: {NAT: torch.tensor(STUB[NAT])}

    yield
    for name in (FACE, AES, NAT):
        REGISTRY.pop(name, None)


def _inputs():
    frames = torch.zeros(2, 1, 8, 8, 3, dtype=torch.uint8)
    return RewardInputs(frames, [[Image.new("RGB", (8, 8))]] * 2, ["a", "b"])


def _idcrafter_config(level="reward"):
    return SimpleNamespace(
        reward_fn={FACE: 1.0, AES: 1.0, NAT: 1.0},
        reward_combination={"mode": "idcrafter", "level": level,
                            "idcrafter": {"face_key": FACE, "quality_keys": [AES, NAT]}},
    )


def test_face_fidelity_blends_mean_and_worst_subject():
    # 0.5 * 0.8 + 0.5 * 0.6 = 0.7; 0.5 * 0.6 + 0.5 * 0.2 = 0.4; gamma 1 is the worst subject alone.
    assert face_fidelity(torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.2])).tolist() == pytest.approx([0.7, 0.4])
    assert face_fidelity(torch.tensor([0.8]), torch.tensor([0.6]), gamma=1.0).tolist() == pytest.approx([0.6])


def test_idcrafter_weights_are_the_papers_split():
    weights = idcrafter_key_weights({AES: 0.5, NAT: 0.5}, face_key=FACE)
    assert weights == pytest.approx({FACE: 0.3, f"{FACE}/min": 0.3, AES: 0.2, NAT: 0.2})
    assert sum(weights.values()) == pytest.approx(1.0)


def test_idcrafter_reward_by_hand(stub_rewards):
    reward_fn = build_reward_fn(_idcrafter_config(), torch.device("cpu"))
    scores, seconds = reward_fn(_inputs())
    # R_face = [0.7, 0.4]; R_qual = mean(aes, nat) = [0.6, 0.6];
    # R = 0.6 * R_face + 0.4 * R_qual = [0.42 + 0.24, 0.24 + 0.24] = [0.66, 0.48].
    assert scores["composite/face"].tolist() == pytest.approx([0.7, 0.4])
    assert scores["composite/quality"].tolist() == pytest.approx([0.6, 0.6])
    assert scores["total"].tolist() == pytest.approx([0.66, 0.48])
    assert set(seconds) == {FACE, AES, NAT}  # every base reward timed on its own


def test_idcrafter_names_the_missing_rewards(stub_rewards):
    config = _idcrafter_config()
    config.reward_fn = {FACE: 1.0}
    with pytest.raises(ValueError, match=AES):
        build_reward_fn(config, torch.device("cpu"))


def test_rule_judge_favours_the_weakest_group():
    # Group means 0.7 and 0.6, temperature 0.1: softmax([-7, -6]) = [1, e] / (1 + e).
    weights = rule_batch_weights(torch.tensor([[0.8, 0.6], [0.6, 0.6]]), temperature=0.1)
    assert weights.tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])
    with pytest.raises(ValueError, match="temperature"):
        rule_batch_weights(torch.zeros(1, 2), temperature=0.0)


def test_blend_normalises_the_prior():
    # Prior [3, 1] -> [0.75, 0.25]; gamma 0.5 with batch [0, 1]: [0.375, 0.625].
    blended = blend_weights(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0]), gamma=0.5)
    assert blended.tolist() == pytest.approx([0.375, 0.625])
    with pytest.raises(ValueError, match="gamma"):
        blend_weights(torch.tensor([1.0]), torch.tensor([1.0]), gamma=1.5)


def test_normalise_score_clips_to_the_range():
    assert normalise_score(torch.tensor([0.0, 5.0, 12.0]), 0.0, 10.0).tolist() == [0.0, 0.5, 1.0]


def test_evoid_reward_by_hand(stub_rewards):
    config = SimpleNamespace(
        reward_fn={FACE: 1.0, AES: 1.0, NAT: 1.0},
        reward_combination={"mode": "evoid", "evoid": {
            "groups": {"identity": [FACE], "quality": [AES, NAT]}, "temperature": 0.1, "gamma": 0.5}},
    )
    scores, _ = build_reward_fn(config, torch.device("cpu"))(_inputs())
    # Groups: identity = face = [0.8, 0.6] (mean 0.7), quality = (aes + nat) / 2 = [0.6, 0.6] (mean 0.6).
    # p_batch = [1, e] / (1 + e); uniform prior [0.5, 0.5]; p = 0.5 * prior + 0.5 * p_batch.
    p_identity = 0.25 + 0.5 / (1 + math.e)
    p_quality = 0.25 + 0.5 * math.e / (1 + math.e)
    assert p_identity == pytest.approx(0.384470, abs=1e-6)
    assert scores["composite/weight/identity"].tolist() == pytest.approx([p_identity] * 2)
    assert scores["composite/quality"].tolist() == pytest.approx([0.6, 0.6])
    expected = [p_identity * 0.8 + p_quality * 0.6, p_identity * 0.6 + p_quality * 0.6]  # [0.676894, 0.6]
    assert scores["total"].tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.676894, abs=1e-6)


def test_evoid_default_groups_and_unassigned_rewards():
    combination = Combination.from_config(SimpleNamespace(
        reward_fn={"facesim": 2.0, "aesthetic": 1.0, "naturalness": 3.0}, reward_combination={"mode": "evoid"}))
    assert combination.groups == {"identity": {"facesim": 1.0}, "quality": {"aesthetic": 0.25, "naturalness": 0.75}}
    assert combination.prior == {"identity": 1.0, "quality": 1.0}
    with pytest.raises(ValueError, match="in no evoid group"):
        Combination.from_config(SimpleNamespace(reward_fn={"facesim": 1.0, "clip_text": 1.0},
                                                reward_combination={"mode": "evoid"}))


def test_reward_level_vs_advantage_level_by_hand():
    # One group of two. r1 = [0, 1] and r2 = [30, 10], weights 0.5 each.
    # Reward level: total [15, 5.5] -> mean 10.25, std 4.75: advantages +-4.75 / (4.75 + 1e-4), r2 dominates.
    # Advantage level: r1 -> [-1, 1], r2 -> [1, -1] (each / (std + 1e-4)); 0.5 * sum = [0, 0] up to eps terms.
    rewards = {"r1": torch.tensor([0.0, 1.0]), "r2": torch.tensor([30.0, 10.0])}
    groups = torch.tensor([4, 4])
    weights = {"r1": 0.5, "r2": 0.5}
    at_reward, _ = weighted_group_advantages(rewards, groups, weights, level="reward")
    assert at_reward.tolist() == pytest.approx([4.75 / 4.7501, -4.75 / 4.7501])
    at_advantage, stats = weighted_group_advantages(rewards, groups, weights, level="advantage")
    expected = 0.5 * (-0.5 / 0.5001 + 10.0 / 10.0001)
    assert at_advantage.tolist() == pytest.approx([expected, -expected], abs=1e-7)
    assert abs(expected) < 1e-3
    assert stats.num_zero_std_groups == 0


def test_advantage_level_counts_a_group_constant_only_when_every_reward_is():
    rewards = {"r1": torch.tensor([1.0, 1.0, 0.0, 2.0]), "r2": torch.tensor([3.0, 5.0, 7.0, 7.0])}
    advantages, stats = weighted_group_advantages(rewards, torch.tensor([0, 0, 1, 1]), {"r1": 1.0, "r2": 2.0},
                                                  level="advantage", clip_max=1.5)
    # Group 0: r1 constant -> 0, r2 [-1, 1] -> 2 * [-1, 1] clipped to 1.5. Group 1: r1 [-1, 1], r2 constant.
    assert advantages.tolist() == pytest.approx([-1.5, 1.5, -1.0, 1.0], abs=1e-3)
    assert stats.num_zero_std_groups == 0
    with pytest.raises(ValueError, match="not among the rewards"):
        weighted_group_advantages(rewards, torch.tensor([0, 0, 1, 1]), {"r3": 1.0})
    with pytest.raises(ValueError, match="level"):
        weighted_group_advantages(rewards, torch.tensor([0, 0, 1, 1]), {"r1": 1.0}, level="sample")


def test_epoch_advantages_sum_mode_is_the_old_path():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 0.0]), "b": torch.tensor([0.0, 1.0, 1.0, 1.0])}
    groups = torch.tensor([0, 0, 1, 1])
    config = SimpleNamespace(reward_fn={"a": 1.0, "b": 2.0})
    result = epoch_advantages(scores, groups, config)
    expected, _ = group_advantages(scores["a"] + 2.0 * scores["b"], groups)
    assert torch.equal(result.advantages, expected)
    assert result.metrics == {"reward/weight/a": 1.0, "reward/weight/b": 2.0}


def test_epoch_advantages_idcrafter_at_the_advantage_level():
    scores = {k: torch.tensor(v) for k, v in STUB.items()}
    result = epoch_advantages(scores, torch.tensor([0, 0]), _idcrafter_config(level="advantage"))
    # One group of two: each key normalises to +-1 (up to eps). Video 0 is higher on face, face/min and
    # naturalness, lower on aesthetic: 0.3 * 1 + 0.3 * 1 + 0.2 * (-1) + 0.2 * 1 = 0.6.
    assert result.advantages.tolist() == pytest.approx([0.6, -0.6], abs=1e-3)
    assert result.metrics["reward/weight/_stub_face/min"] == pytest.approx(0.3)


def test_combined_reward_is_reused_unchanged_in_sum_mode(stub_rewards):
    reward_fn = build_reward_fn(SimpleNamespace(reward_fn={AES: 2.0}), torch.device("cpu"))
    assert isinstance(reward_fn, CombinedReward)
    assert reward_fn(_inputs())[0]["total"].tolist() == pytest.approx([1.0, 1.8])


def test_quality_rewards_name_their_config_fields_when_weights_are_absent(tmp_path):
    with pytest.raises(ValueError, match="config.aesthetic.clip_path"):
        REGISTRY["aesthetic"](SimpleNamespace(), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="config.naturalness.model_path"):
        REGISTRY["naturalness"](SimpleNamespace(naturalness={"model_path": str(tmp_path / "none")}), torch.device("cpu"))
