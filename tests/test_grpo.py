"""The clipped GRPO objective with hand-computed ratios, advantages and KL terms."""

import math

import pytest
import torch

from identity_grpo.grpo import grpo_loss

E = math.e


def _loss(log_ratio, advantages, **kwargs):
    log_prob = torch.tensor(log_ratio, dtype=torch.float32)
    return grpo_loss(log_prob, torch.zeros_like(log_prob), torch.tensor(advantages), **kwargs)


def test_ratio_e_positive_advantage_is_clipped_to_one_plus_eps():
    # ratio e > 1.2: max(-1 * e, -1 * 1.2) = -1.2
    loss, stats = _loss([1.0], [1.0], clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(-1.2, abs=1e-6)
    assert stats["clipfrac"].item() == 1.0
    assert stats["ratio"].item() == pytest.approx(E, abs=1e-6)


def test_ratio_e_is_clipped_with_an_offset_old_log_prob():
    # Only the difference matters: log_prob 3.5, old 2.5.
    loss, _ = grpo_loss(torch.tensor([3.5]), torch.tensor([2.5]), torch.tensor([1.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)


def test_negative_advantage_by_hand():
    # adv -1, ratio e:    max(e, 1.2)          = e      (unclipped: pushing the ratio down is always allowed)
    # adv -1, ratio 1/e:  max(0.367879, 0.8)   = 0.8    (clipped at 1 - eps)
    # adv -2, ratio 1:    max(2, 2)            = 2
    loss, stats = _loss([1.0, -1.0, 0.0], [-1.0, -1.0, -2.0], clip_range=0.2)
    assert loss.item() == pytest.approx((E + 0.8 + 2.0) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-7)


def test_ratio_one_gives_minus_mean_advantage():
    advantages = [1.5, -0.5, 2.0, -3.0]
    loss, stats = _loss([0.0] * 4, advantages, clip_range=0.2)
    assert loss.item() == pytest.approx(-sum(advantages) / 4, abs=1e-7)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_beta_times_kl_is_added():
    # policy part at ratio 1: -mean([1, 3]) = -2; kl mean 1.0; loss = -2 + 0.04 * 1.0
    log_prob = torch.zeros(2)
    loss, stats = grpo_loss(
        log_prob, log_prob, torch.tensor([1.0, 3.0]), clip_range=0.2, kl=torch.tensor([0.5, 1.5]), beta=0.04
    )
    assert loss.item() == pytest.approx(-2.0 + 0.04, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(-2.0, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(1.0, abs=1e-7)


def test_approx_kl_by_hand():
    # 0.5 * mean(0.1^2, 0.3^2, 0.5^2) = 0.5 * 0.35 / 3 = 0.0583333
    _, stats = _loss([0.1, -0.3, 0.5], [1.0, 1.0, 1.0], clip_range=0.2)
    assert stats["approx_kl"].item() == pytest.approx(0.35 / 6, abs=1e-6)


def test_clipfrac_counts_ratios_outside_the_range():
    # ratios e^0.1 = 1.105 (in), e^0.3 = 1.350 (out), e^-0.3 = 0.741 (out), 1 (in) with clip 0.2
    _, stats = _loss([0.1, 0.3, -0.3, 0.0], [1.0, 1.0, 1.0, 1.0], clip_range=0.2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_beta_without_kl_raises():
    with pytest.raises(ValueError, match="kl"):
        _loss([0.0], [1.0], clip_range=0.2, beta=0.1)


def test_gradient_is_zero_for_samples_clipped_in_the_direction_of_their_advantage():
    # 0: adv +1, ratio e     -> clipped above 1 + eps: no push further up       -> grad 0
    # 1: adv -1, ratio 1/e   -> clipped below 1 - eps: no push further down     -> grad 0
    # 2: adv +1, ratio 1     -> d/dlogp of -adv * exp(logp - old) / B = -1 / 4
    # 3: adv -1, ratio e     -> unclipped (moving it back is allowed): +e / 4
    log_prob = torch.tensor([1.0, -1.0, 0.0, 1.0], requires_grad=True)
    loss, _ = grpo_loss(log_prob, torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, -1.0]), clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, -1 / 4, E / 4]), rtol=1e-6, atol=1e-7)


def test_stats_are_detached():
    log_prob = torch.tensor([0.3], requires_grad=True)
    _, stats = grpo_loss(log_prob, torch.zeros(1), torch.tensor([1.0]), clip_range=0.2)
    assert not any(value.requires_grad for value in stats.values())


def test_mean_stats_averages_each_key_over_the_calls_that_have_it():
    """grad_norm exists only on the optimizer-step call of an accumulation window; it is
    logged (its own mean), and the per-call keys average over every call."""
    from types import SimpleNamespace

    from identity_grpo.loop import mean_stats

    single_process = SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor)
    stats = [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)},
             {"loss": torch.tensor(6.0), "grad_norm": torch.tensor(0.5)}]
    assert mean_stats(stats, single_process) == {"loss": 3.0, "grad_norm": 0.5}
