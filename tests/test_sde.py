"""The SDE step, its log-density and the KL term, checked against hand values and torch.distributions."""

import math

import pytest
import torch

from identity_grpo.sde import NOISE_SCHEDULES, gaussian_kl, noise_scale, sde_step

# Schedules scored with the exact Gaussian density; "cps" uses Flow-GRPO's squared-error form.
GAUSSIAN_SCHEDULES = tuple(s for s in NOISE_SCHEDULES if s != "cps")

# A (B, C, F, H, W) video latent: the shape the training loop actually scores.
SHAPE = (3, 4, 5, 6, 8)
SIGMA = torch.tensor([0.9, 0.6, 0.3])
SIGMA_NEXT = torch.tensor([0.8, 0.5, 0.1])
SCHEDULE_KWARGS = {"sigma_max": 0.95, "sigma_min": 0.05}
ZERO_NOISE = torch.zeros(1, 1)  # the one-element steps below land on their mean


def _latents(shape=SHAPE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model_output = torch.randn(shape, generator=generator)
    sample = torch.randn(shape, generator=generator)
    return model_output, sample


def _scalar_step(x, v, sigma, sigma_next, **kwargs):
    """One-element latent, so every number of the step can be checked by hand."""
    return sde_step(torch.tensor([[v]]), torch.tensor([[x]]), sigma, sigma_next, **kwargs)


def _reference_log_prob(x, mean, std):
    """torch.distributions' elementwise log-density, averaged over the non-batch dims."""
    log_prob = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("schedule", ["identity_grpo", "flow_grpo"])
def test_zero_noise_is_exactly_the_euler_step(schedule):
    model_output, sample = _latents()
    out = sde_step(
        model_output, sample, SIGMA, SIGMA_NEXT, schedule=schedule, noise_level=0.0,
        generator=torch.Generator().manual_seed(1), **SCHEDULE_KWARGS,
    )
    # dt is formed in float32, as the step does, so the comparison can be bitwise.
    dt = (SIGMA_NEXT - SIGMA).reshape(-1, 1, 1, 1, 1)
    euler = sample + dt * model_output
    assert torch.equal(out.prev_sample, euler)
    assert torch.equal(out.prev_sample_mean, euler)
    assert out.log_prob is None


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_deterministic_is_the_euler_step(schedule):
    model_output, sample = _latents()
    out = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, schedule=schedule, deterministic=True, **SCHEDULE_KWARGS)
    dt = (SIGMA_NEXT - SIGMA).reshape(-1, 1, 1, 1, 1)
    assert torch.equal(out.prev_sample, sample + dt * model_output)
    assert out.log_prob is None
    assert not bool(out.std.any())


@pytest.mark.parametrize("schedule", GAUSSIAN_SCHEDULES)
def test_log_prob_is_mean_of_normal_log_prob_on_5d_latents(schedule):
    model_output, sample = _latents()
    out = sde_step(
        model_output, sample, SIGMA, SIGMA_NEXT, schedule=schedule, noise_level=0.7,
        generator=torch.Generator().manual_seed(2), **SCHEDULE_KWARGS,
    )
    assert out.log_prob.shape == (SHAPE[0],)
    assert out.std.shape == (SHAPE[0], 1, 1, 1, 1)
    expected = _reference_log_prob(out.prev_sample, out.prev_sample_mean, out.std)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_rescoring_the_sampled_transition_reproduces_its_log_prob(schedule):
    model_output, sample = _latents()
    kwargs = dict(schedule=schedule, noise_level=0.7, **SCHEDULE_KWARGS)
    sampled = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, generator=torch.Generator().manual_seed(3), **kwargs)
    rescored = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, prev_sample=sampled.prev_sample, **kwargs)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    ratio = torch.exp(rescored.log_prob - sampled.log_prob)
    assert (ratio - 1).abs().max().item() <= 1e-6


def test_rescoring_gradient_flows_through_the_mean_only():
    # identity_grpo, sigma 0.6 -> 0.5: mean = x a + v c with c = (1 + s^2 (1 - sigma) / (2 sigma)) dt, s = 0.58, so
    # d log_prob / d v = (x_next - mean) / std^2 * c / N elementwise (N elements averaged); x_next is a constant.
    model_output, sample = _latents((2, 3, 2, 4, 4))
    kwargs = dict(schedule="identity_grpo", sigma_max=0.9, sigma_min=0.1)
    sampled = sde_step(model_output, sample, 0.6, 0.5, generator=torch.Generator().manual_seed(9), **kwargs)
    model_output.requires_grad_(True)
    rescored = sde_step(model_output, sample, 0.6, 0.5, prev_sample=sampled.prev_sample, **kwargs)
    rescored.log_prob.sum().backward()
    s, n = 0.58, 3 * 2 * 4 * 4
    c = (1 + s**2 * 0.4 / 1.2) * -0.1
    expected = (sampled.prev_sample - sampled.prev_sample_mean) / sampled.std**2 * c / n
    torch.testing.assert_close(model_output.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_per_sample_sigmas_match_single_sample_calls(schedule):
    model_output, sample = _latents()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    kwargs = dict(schedule=schedule, noise_level=0.7, **SCHEDULE_KWARGS)
    batched = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, noise=noise, **kwargs)
    for i in range(SHAPE[0]):
        single = sde_step(
            model_output[i : i + 1], sample[i : i + 1], float(SIGMA[i]), float(SIGMA_NEXT[i]),
            noise=noise[i : i + 1], **kwargs,
        )
        torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(batched.std[i : i + 1], single.std, rtol=0, atol=0)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob, rtol=1e-6, atol=1e-6)


def test_identity_grpo_std_and_mean_by_hand():
    # sigma 0.6 -> 0.5 with sigma_max 0.9, sigma_min 0.1:
    #   s = 0.1 + 0.8 * 0.6 = 0.58,  std = s * sqrt(0.6 - 0.5) = 0.58 * 0.316227766 = 0.183412104
    #   mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
    #        = 0.5 (1 - 0.3364 * 0.1 / 1.2) + (-0.3) (1 + 0.3364 * 0.4 / 1.2) (-0.1) = 0.519347333
    out = _scalar_step(0.5, -0.3, 0.6, 0.5, schedule="identity_grpo", sigma_max=0.9, sigma_min=0.1, noise=ZERO_NOISE)
    assert out.std.item() == pytest.approx(0.183412104, abs=1e-6)
    assert out.prev_sample_mean.item() == pytest.approx(0.519347333, abs=1e-6)


def test_identity_grpo_noise_level_scales_std_linearly():
    full = _scalar_step(0.5, -0.3, 0.6, 0.5, schedule="identity_grpo", sigma_max=0.9, sigma_min=0.1, noise_level=1.0,
                        noise=ZERO_NOISE)
    half = _scalar_step(0.5, -0.3, 0.6, 0.5, schedule="identity_grpo", sigma_max=0.9, sigma_min=0.1, noise_level=0.5,
                        noise=ZERO_NOISE)
    assert half.std.item() == pytest.approx(0.5 * full.std.item(), rel=1e-6)


def test_flow_grpo_std_and_mean_by_hand():
    # sigma 0.8 -> 0.6, noise_level 0.7: s = 0.7 sqrt(0.8 / 0.2) = 1.4, std = 1.4 sqrt(0.2) = 0.626099034
    #   mean = 0.5 (1 - 1.96 * 0.2 / 1.6) + (-0.3) (1 + 1.96 * 0.2 / 1.6) (-0.2) = 0.3775 + 0.0747 = 0.4522
    out = _scalar_step(0.5, -0.3, 0.8, 0.6, schedule="flow_grpo", noise_level=0.7, sigma_max=0.9, noise=ZERO_NOISE)
    assert out.std.item() == pytest.approx(0.626099034, abs=1e-6)
    assert out.prev_sample_mean.item() == pytest.approx(0.4522, abs=1e-6)


def test_flow_grpo_at_sigma_one_uses_sigma_max():
    # Flow-GRPO: s = noise_level * sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))), so at sigma = 1 with
    # sigma_max = 0.9: s = 0.7 sqrt(1 / 0.1), std = s sqrt(1 - 0.9) = 0.7 exactly.
    #   mean = 0.5 (1 - 4.9 * 0.1 / 2) + (-0.3) (1 + 0) (-0.1) = 0.3775 + 0.03 = 0.4075
    out = _scalar_step(0.5, -0.3, 1.0, 0.9, schedule="flow_grpo", noise_level=0.7, sigma_max=0.9, noise=ZERO_NOISE)
    assert out.std.item() == pytest.approx(0.7, abs=1e-6)
    assert out.prev_sample_mean.item() == pytest.approx(0.4075, abs=1e-6)
    assert math.isfinite(out.log_prob.item())


def test_flow_grpo_just_below_sigma_one_is_bounded_by_sigma_max():
    # Wan's UniPC schedule starts at 1 - 1e-6: the denominator is bounded by sigma_max (0.9), so
    # s = 0.7 sqrt(0.999999 / 0.1) instead of 0.7 sqrt(0.999999 / 1e-6) = 700.
    sigma = torch.tensor([1 - 1e-6])
    scale = noise_scale(sigma, torch.tensor([0.9]), schedule="flow_grpo", noise_level=0.7, sigma_max=0.9, sigma_min=0.0)
    assert scale.item() == pytest.approx(0.7 * math.sqrt((1 - 1e-6) / 0.1), rel=1e-6)


def test_cps_std_and_mean_by_hand():
    # sigma 0.8 -> 0.6, noise_level 0.5: std = 0.6 sin(pi / 4) = 0.424264069
    #   x0_hat = 0.5 - 0.8 (-0.3) = 0.74, eps_hat = 0.5 + 0.2 (-0.3) = 0.44
    #   mean = 0.74 (1 - 0.6) + 0.44 sqrt(0.36 - 0.18) = 0.296 + 0.186676190 = 0.482676190
    out = _scalar_step(0.5, -0.3, 0.8, 0.6, schedule="cps", noise_level=0.5, noise=ZERO_NOISE)
    assert out.std.item() == pytest.approx(0.424264069, abs=1e-6)
    assert out.prev_sample_mean.item() == pytest.approx(0.482676190, abs=1e-6)


def test_cps_log_prob_is_flow_grpos_squared_error():
    # Flow-GRPO (sde_type "cps"): log_prob = -(x - mean)^2, constants and 1 / (2 std^2) dropped, mean over dims.
    model_output, sample = _latents()
    kwargs = dict(schedule="cps", noise_level=0.7, **SCHEDULE_KWARGS)
    out = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, generator=torch.Generator().manual_seed(2), **kwargs)
    expected = -((out.prev_sample - out.prev_sample_mean) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(out.log_prob, expected, rtol=0, atol=0)
    # Against the exact density of the same step the log-ratio of a perturbed mean shrinks by 2 std^2.
    exact = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, noise=torch.zeros(SHAPE), **{**kwargs, "schedule": "cps_exact"})
    shifted = dict(prev_sample=exact.prev_sample + 0.1)
    ratio_cps = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, **shifted, **kwargs).log_prob
    ratio_exact = sde_step(model_output, sample, SIGMA, SIGMA_NEXT, **shifted,
                           **{**kwargs, "schedule": "cps_exact"}).log_prob - exact.log_prob
    torch.testing.assert_close(ratio_exact, ratio_cps / (2 * exact.std.flatten() ** 2), rtol=1e-5, atol=0)


def test_cps_final_step_is_its_mean_with_a_defined_log_prob():
    # sigma_next = 0: std = 0, the step lands on x0_hat = x - sigma v; Flow-GRPO still scores it (-(x - mean)^2 = 0).
    out = _scalar_step(0.5, -0.3, 0.2, 0.0, schedule="cps", noise_level=0.7, noise=torch.ones(1, 1))
    assert out.std.item() == 0.0
    assert out.prev_sample.item() == pytest.approx(0.5 + 0.2 * 0.3, abs=1e-7)
    assert out.log_prob.item() == 0.0
    # The exact density has none there.
    assert _scalar_step(0.5, -0.3, 0.2, 0.0, schedule="cps_exact", noise=torch.ones(1, 1)).log_prob is None


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_bf16_inputs_give_float32_outputs(schedule):
    model_output, sample = _latents()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    kwargs = dict(schedule=schedule, noise_level=0.7, noise=noise, **SCHEDULE_KWARGS)
    low = sde_step(model_output.bfloat16(), sample.bfloat16(), SIGMA, SIGMA_NEXT, **kwargs)
    for tensor in (low.prev_sample, low.log_prob, low.prev_sample_mean, low.std):
        assert tensor.dtype == torch.float32
    # The arithmetic is the float32 step on the upcast inputs, not a bf16 one.
    full = sde_step(model_output.bfloat16().float(), sample.bfloat16().float(), SIGMA, SIGMA_NEXT, **kwargs)
    assert torch.equal(low.prev_sample, full.prev_sample)
    assert torch.equal(low.log_prob, full.log_prob)


@pytest.mark.parametrize("schedule", NOISE_SCHEDULES)
def test_samples_follow_the_reported_mean_and_std(schedule):
    shape = (3, 4, 5, 50, 100)  # 100,000 draws per sample
    model_output, sample = _latents(shape, seed=6)
    out = sde_step(
        model_output, sample, SIGMA, SIGMA_NEXT, schedule=schedule, noise_level=0.7,
        generator=torch.Generator().manual_seed(7), **SCHEDULE_KWARGS,
    )
    z = ((out.prev_sample - out.prev_sample_mean) / out.std).flatten(1)
    # With n = 1e5 standard-normal draws, the sample mean has sd 1/sqrt(n) = 0.0032 and the sample std has
    # sd ~ 1/sqrt(2n) = 0.0022; 0.02 is > 6 sd for both, so a correct sampler fails with probability < 1e-8,
    # while a std off by 2% (or a mean shifted by 0.02 std) is caught.
    assert z.mean(dim=1).abs().max().item() < 0.02
    assert (z.std(dim=1) - 1).abs().max().item() < 0.02


def test_gaussian_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(8)
    mean_p = torch.randn(SHAPE, generator=generator)
    mean_q = torch.randn(SHAPE, generator=generator)
    std = torch.tensor([0.3, 1.0, 2.5]).reshape(-1, 1, 1, 1, 1)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, std.expand(SHAPE)), torch.distributions.Normal(mean_q, std.expand(SHAPE))
    ).mean(dim=(1, 2, 3, 4))
    kl = gaussian_kl(mean_p, mean_q, std)
    assert kl.shape == (SHAPE[0],)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_kl(mean_p, mean_p, std), torch.zeros(SHAPE[0]))


def test_gaussian_kl_by_hand():
    # Elements differ by 0.2 and 0.4 with std 0.5: (0.04 + 0.16) / 2 / (2 * 0.25) = 0.2
    kl = gaussian_kl(torch.tensor([[0.2, 0.4]]), torch.zeros(1, 2), torch.tensor([[0.5]]))
    assert kl.item() == pytest.approx(0.2, abs=1e-7)


def test_prev_sample_with_generator_or_noise_raises():
    model_output, sample = _latents()
    with pytest.raises(ValueError, match="prev_sample"):
        sde_step(model_output, sample, SIGMA, SIGMA_NEXT, prev_sample=sample, generator=torch.Generator())
    with pytest.raises(ValueError, match="prev_sample"):
        sde_step(model_output, sample, SIGMA, SIGMA_NEXT, prev_sample=sample, noise=torch.zeros(SHAPE))


def test_unknown_schedule_raises():
    model_output, sample = _latents()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        sde_step(model_output, sample, SIGMA, SIGMA_NEXT, schedule="ddim")
