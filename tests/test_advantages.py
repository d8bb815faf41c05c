"""Group-normalised advantages with hand-computed groups."""

import math

import pytest
import torch

from identity_grpo.advantages import group_advantages, zero_std_mask

EPS = 1e-4
# Group [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.816497; 1 / (0.816497 + 1e-4) = 1.224595
ONE_OVER_STD_123 = 1 / (math.sqrt(2 / 3) + EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 0.7, 0.123456789, 3.0])
def test_constant_group_gives_exactly_zero(value, dtype):
    # K = 3 copies of 0.1 in float64 sum to 0.30000000000000004, whose mean is not 0.1: the zero must not
    # depend on the mean being exact.
    rewards = torch.tensor([value] * 3 + [1.0, 2.0, 3.0], dtype=dtype)
    advantages, stats = group_advantages(rewards, torch.tensor([7, 7, 7, 8, 8, 8]), eps=EPS)
    assert (advantages[:3] == 0).all()
    assert stats.num_zero_std_groups == 1


def test_constant_group_is_zero_with_global_std_too():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), global_std=True)
    assert (advantages[:3] == 0).all()


def test_group_by_hand():
    advantages, stats = group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 0]), eps=EPS)
    torch.testing.assert_close(advantages, torch.tensor([-ONE_OVER_STD_123, 0.0, ONE_OVER_STD_123]))
    assert advantages[2].item() == pytest.approx(1.224595, abs=1e-6)
    assert stats.num_groups == 1
    assert stats.num_zero_std_groups == 0
    assert stats.mean_group_size == 3.0
    assert advantages.dtype == torch.float32


def test_interleaved_groups_are_normalised_independently():
    # Group 5: [1, 2, 3] (mean 2, std sqrt(2/3)); group 9: [10, 30] (mean 20, std 10).
    rewards = torch.tensor([1.0, 10.0, 2.0, 30.0, 3.0])
    group_ids = torch.tensor([5, 9, 5, 9, 5])
    advantages, stats = group_advantages(rewards, group_ids, eps=EPS)
    expected = torch.tensor([-ONE_OVER_STD_123, -10 / (10 + EPS), 0.0, 10 / (10 + EPS), ONE_OVER_STD_123])
    torch.testing.assert_close(advantages, expected)
    assert stats.num_groups == 2
    assert stats.mean_group_size == 2.5


def test_global_std_uses_the_std_of_all_rewards():
    # All rewards [1, 3, 10, 14]: mean 7, population std sqrt((36 + 16 + 9 + 49) / 4) = sqrt(27.5)
    # Centred within groups: [-1, 1, -2, 2].
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    advantages, _ = group_advantages(rewards, torch.tensor([0, 0, 1, 1]), global_std=True, eps=EPS)
    std = math.sqrt(27.5) + EPS
    torch.testing.assert_close(advantages, torch.tensor([-1 / std, 1 / std, -2 / std, 2 / std]))


def test_clipped_at_clip_max():
    # Group [0]*9 + [1]: mean 0.1, std 0.3; the outlier is 0.9 / 0.3 = 3 std out, the rest -1/3.
    rewards = torch.tensor([0.0] * 9 + [1.0])
    advantages, _ = group_advantages(rewards, torch.zeros(10, dtype=torch.long), clip_max=2.0, eps=EPS)
    assert advantages[-1].item() == 2.0
    assert advantages[0].item() == pytest.approx(-0.1 / (0.3 + EPS), abs=1e-6)
    unclipped, _ = group_advantages(rewards, torch.zeros(10, dtype=torch.long), clip_max=5.0, eps=EPS)
    assert unclipped[-1].item() == pytest.approx(0.9 / (0.3 + EPS), abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_raise_naming_the_indices(bad):
    rewards = torch.tensor([0.5, 1.0, bad, 0.2, bad])
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        group_advantages(rewards, torch.tensor([0, 0, 1, 1, 1]))


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def test_num_zero_std_groups_is_counted():
    # Groups 0 and 2 constant, 1 and 3 not.
    rewards = torch.tensor([0.5, 0.5, 1.0, 2.0, -1.0, -1.0, 0.0, 0.1])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    _, stats = group_advantages(rewards, group_ids)
    assert stats.num_groups == 4
    assert stats.num_zero_std_groups == 2


def test_zero_std_mask():
    rewards = torch.tensor([0.5, 1.0, 0.5, 2.0, 3.0, -1.0])
    group_ids = torch.tensor([4, 1, 4, 1, 9, 9])
    mask = zero_std_mask(rewards, group_ids)
    assert mask.tolist() == [True, False, True, False, False, False]
    assert zero_std_mask(torch.tensor([1.0]), torch.tensor([3])).tolist() == [True]
