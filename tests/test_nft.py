"""DiffusionNFT's loss, checked against numbers worked out by hand."""

import pytest
import torch

from identity_grpo.nft import nft_loss, old_policy_decay, optimality_probability

X0 = torch.tensor([[0.2, -0.4]])
EPS = torch.tensor([[1.0, 0.6]])
T = torch.tensor([0.5])
X_T = (1 - 0.5) * X0 + 0.5 * EPS  # [0.6, 0.1]
V_OLD = torch.tensor([[0.1, 0.3]])


def test_optimality_probability():
    advantages = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    assert optimality_probability(advantages, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_loss_at_the_old_policy_by_hand(r):
    # v_theta = v_old: v+ = v- = v_old, so L+ = L- and the loss is the same for every r.
    #   x0_hat = x_t - t v = [0.6 - 0.05, 0.1 - 0.15] = [0.55, -0.05]; error e = x0_hat - x0 = [0.35, 0.35]
    #   L = mean(e^2) / mean|e| = 0.1225 / 0.35 = 0.35;  loss = L / beta * adv_clip_max = 0.35 / 0.5 * 5 = 3.5
    loss, stats = nft_loss(V_OLD.clone(), V_OLD, X_T, X0, T, torch.tensor([r]), nft_beta=0.5, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(3.5, abs=1e-6)
    assert stats["positive_loss"].item() == pytest.approx(0.35, abs=1e-6)
    assert stats["negative_loss"].item() == pytest.approx(0.35, abs=1e-6)
    assert stats["old_deviation"].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_gradient_pulls_towards_the_clean_velocity_for_r_1_and_pushes_for_r_0(beta):
    # The clean sample's velocity is v* = (x_t - x0) / t = [0.8, 1.0]. At v_theta = v_old the positive branch's
    # gradient is c * 2 t^2 (v - v*) / (N * w) with w = mean|t (v* - v)| = 0.35 and N = 2 elements, for any beta:
    #   c * 2 * 0.25 * [-0.7, -0.7] / (2 * 0.35) = 5 * [-0.5, -0.5] = [-2.5, -2.5]. The negative branch flips the sign.
    v_star = (X_T - X0) / 0.5
    grads = {}
    for r in (0.0, 1.0):
        v_theta = V_OLD.clone().requires_grad_(True)
        loss, _ = nft_loss(v_theta, V_OLD, X_T, X0, T, torch.tensor([r]), nft_beta=beta, adv_clip_max=5.0)
        loss.backward()
        grads[r] = v_theta.grad
    torch.testing.assert_close(grads[1.0], torch.tensor([[-2.5, -2.5]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0.0], torch.tensor([[2.5, 2.5]]), rtol=1e-5, atol=1e-6)
    # Gradient descent with r = 1 moves v_theta towards v*; with r = 0 away from it.
    assert ((V_OLD - 0.01 * grads[1.0] - v_star).abs() < (V_OLD - v_star).abs()).all()
    assert ((V_OLD - 0.01 * grads[0.0] - v_star).abs() > (V_OLD - v_star).abs()).all()


def test_kl_term_is_the_velocity_distance_to_the_base():
    v_theta, v_ref = torch.tensor([[0.4, 0.0]]), torch.tensor([[0.1, 0.4]])
    without, _ = nft_loss(v_theta, V_OLD, X_T, X0, T, torch.tensor([1.0]), nft_beta=1.0, adv_clip_max=5.0)
    loss, stats = nft_loss(v_theta, V_OLD, X_T, X0, T, torch.tensor([1.0]), nft_beta=1.0, adv_clip_max=5.0,
                           v_ref=v_ref, kl_weight=0.1)
    # mean((0.3)^2, (-0.4)^2) = (0.09 + 0.16) / 2 = 0.125
    assert stats["kl"].item() == pytest.approx(0.125, abs=1e-7)
    assert loss.item() == pytest.approx(without.item() + 0.1 * 0.125, abs=1e-6)


def test_batch_of_video_latents_reduces_per_sample():
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4, 2, 4, 4)
    x0, eps, v_theta, v_old = (torch.randn(shape, generator=generator) for _ in range(4))
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    r = torch.tensor([0.0, 0.3, 1.0])
    batched, _ = nft_loss(v_theta, v_old, x_t, x0, t, r, nft_beta=0.7, adv_clip_max=5.0)
    singles = [nft_loss(v_theta[i:i + 1], v_old[i:i + 1], x_t[i:i + 1], x0[i:i + 1], t[i:i + 1], r[i:i + 1],
                        nft_beta=0.7, adv_clip_max=5.0)[0] for i in range(3)]
    assert batched.item() == pytest.approx(sum(s.item() for s in singles) / 3, rel=1e-5)


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s, 0) for s in (0, 10, 1000)] == [0.0, 0.0, 0.0]
    assert [old_policy_decay(s, 1) for s in (0, 100, 499, 1000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 100, 1000)] == pytest.approx([0.0, 0.0, 0.0, 0.1875, 0.999])
    with pytest.raises(ValueError, match="decay_type"):
        old_policy_decay(1, 3)
