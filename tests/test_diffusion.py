"""Gaussian diffusion against closed-form float64 references written from the formulas."""

import math

import numpy as np
import pytest
import torch

from switchdit_dist.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    beta_schedule,
    classifier_free_guidance,
    create_diffusion,
    mix_guidance,
    space_timesteps,
)
from switchdit_dist.diffusion.distributions import discretized_gaussian_log_likelihood, normal_kl
from switchdit_dist.errors import UserError
from switchdit_dist.models.registry import build_model, model_config

LN2 = math.log(2.0)


# -- references ----------------------------------------------------------------------------


def ref_linear_betas(T):
    return np.linspace(1e-4 * 1000 / T, 2e-2 * 1000 / T, T)


def ref_tables(betas):
    """alpha_bar_t and alpha_bar_{t-1} straight from the definition."""
    abar = np.cumprod(1.0 - betas)
    return abar, np.concatenate([[1.0], abar[:-1]])


def ref_posterior(betas, x0, xt, t):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule on two Gaussians (t >= 1), and x_0 itself at t = 0.

    Returns mean, variance and log-variance with t = 0 clipped to the t = 1 value.
    """
    abar, abar_prev = ref_tables(betas)
    alpha = 1.0 - betas
    # Precision of the product of q(x_t | x_{t-1}) (as a function of x_{t-1}) and q(x_{t-1} | x_0).
    with np.errstate(divide="ignore"):
        precision = alpha / betas + 1.0 / (1.0 - abar_prev)
    post_var = np.where(abar_prev < 1.0, 1.0 / precision, 0.0)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a_t, b_t, ap = alpha[t].reshape(shape), betas[t].reshape(shape), abar_prev[t].reshape(shape)
    v = post_var[t].reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        bayes_mean = v * (np.sqrt(a_t) * xt / b_t + np.sqrt(ap) * x0 / (1.0 - ap))
    mean = np.where(t.reshape(shape) == 0, x0, bayes_mean)
    log_var_clipped = np.log(np.where(np.arange(len(betas)) == 0, post_var[1], post_var))
    return mean, np.broadcast_to(v, x0.shape), np.broadcast_to(log_var_clipped[t].reshape(shape), x0.shape)


def ref_kl(m1, lv1, m2, lv2):
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def ref_cdf(z):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def ref_discretized_ll(x, mean, std):
    upper = np.where(x > 0.999, 1.0, ref_cdf((x + 1 / 255 - mean) / std))
    lower = np.where(x < -0.999, 0.0, ref_cdf((x - 1 / 255 - mean) / std))
    return np.log(np.maximum(upper - lower, 1e-12))


def ref_vlb_bits(betas, model_out, x0, xt, t):
    """The improved-DDPM VLB term per sample, in bits per dim, for an (eps, v) model output."""
    C = x0.shape[1]
    eps, v = model_out[:, :C], model_out[:, C:]
    abar, _ = ref_tables(betas)
    shape = (-1, 1, 1, 1)
    ab = abar[t].reshape(shape)
    x0_hat = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    model_mean, _, min_log = ref_posterior(betas, x0_hat, xt, t)
    max_log = np.log(betas[t]).reshape(shape)
    log_var = (v + 1) / 2 * max_log + (1 - v) / 2 * min_log
    true_mean, _, true_log_var = ref_posterior(betas, x0, xt, t)
    kl = ref_kl(true_mean, true_log_var, model_mean, log_var).mean(axis=(1, 2, 3)) / LN2
    nll = -ref_discretized_ll(x0, model_mean, np.exp(0.5 * log_var)).mean(axis=(1, 2, 3)) / LN2
    return np.where(t == 0, nll, kl)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# -- schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 250])
def test_linear_schedule_is_adm_scaled(T):
    betas = beta_schedule("linear", T)
    np.testing.assert_allclose(betas, ref_linear_betas(T), rtol=1e-14)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T) and betas[-1] == pytest.approx(2e-2 * 1000 / T)


def test_cosine_schedule_follows_its_alpha_bar():
    T = 1000
    betas = beta_schedule("cosine", T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    abar, _ = ref_tables(betas)
    unclipped = betas < 0.999
    np.testing.assert_allclose(abar[unclipped], (f[1:] / f[0])[unclipped], rtol=1e-10)
    assert betas.max() <= 0.999


def test_bad_schedule_names_the_value():
    with pytest.raises(UserError, match="noise_schedule.*'quadratic'"):
        beta_schedule("quadratic", 1000)
    with pytest.raises(UserError, match="num_timesteps"):
        create_diffusion(num_timesteps=1)


# -- forward process and posterior -----------------------------------------------------------


def test_q_mean_variance_and_sample(rng):
    diffusion = create_diffusion()
    betas = ref_linear_betas(1000)
    abar, _ = ref_tables(betas)
    x0, noise = rng.normal(size=(6, 3, 4, 4)), rng.normal(size=(6, 3, 4, 4))
    t = np.array([0, 1, 10, 500, 998, 999])
    mean, var, log_var = diffusion.q_mean_variance(t64(x0), t64(t))
    ab = abar[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ab) * x0, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(1 - ab, x0.shape), rtol=1e-12)
    np.testing.assert_allclose(log_var.numpy(), np.log(np.broadcast_to(1 - ab, x0.shape)), rtol=1e-12)
    x_t = diffusion.q_sample(t64(x0), t64(t), t64(noise))
    np.testing.assert_allclose(
        x_t.numpy(), np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-12, atol=1e-14
    )
    # float32 in, float32 out, same numbers to float32 precision.
    x_t32 = diffusion.q_sample(t64(x0).float(), t64(t), t64(noise).float())
    assert x_t32.dtype == torch.float32
    np.testing.assert_allclose(x_t32.numpy(), x_t.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(rng, schedule):
    diffusion = create_diffusion(noise_schedule=schedule)
    betas = beta_schedule(schedule, 1000)
    x0, xt = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3))
    t = np.array([0, 1, 2, 400, 999])
    mean, var, log_var = diffusion.q_posterior_mean_variance(t64(x0), t64(xt), t64(t))
    ref_mean, ref_var, ref_log_var = ref_posterior(betas, x0, xt, t)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(log_var.numpy(), ref_log_var, rtol=1e-9)


def test_normal_kl_matches_closed_form_and_torch(rng):
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50), rng.normal(size=50)
    kl = normal_kl(t64(m1), t64(lv1), t64(m2), t64(lv2)).numpy()
    np.testing.assert_allclose(kl, ref_kl(m1, lv1, m2, lv2), rtol=1e-12, atol=1e-14)
    dist = torch.distributions
    p = dist.Normal(t64(m1), t64(np.exp(0.5 * lv1)))
    q = dist.Normal(t64(m2), t64(np.exp(0.5 * lv2)))
    np.testing.assert_allclose(kl, dist.kl_divergence(p, q).numpy(), rtol=1e-10, atol=1e-12)


def test_discretized_log_likelihood(rng):
    x = np.concatenate([[-1.0, 1.0], rng.uniform(-1, 1, size=98)])
    mean, std = rng.normal(scale=0.5, size=100), np.exp(rng.uniform(-4, 0, size=100))
    ll = discretized_gaussian_log_likelihood(t64(x), t64(mean), t64(np.log(std))).numpy()
    # Compared as probabilities: far in a tail the bin mass is a difference of two CDFs near 1,
    # which both sides round differently (absolute error ~1e-16, large relative error in the log).
    np.testing.assert_allclose(np.exp(ll), np.exp(ref_discretized_ll(x, mean, std)), rtol=1e-9, atol=1e-15)
    # Over the 256 pixel values the bins tile the real line: the probabilities sum to one.
    grid = np.arange(256) / 127.5 - 1.0
    for m, s in [(0.1, 0.05), (-0.7, 0.3), (0.0, 2.0)]:
        ll = discretized_gaussian_log_likelihood(
            t64(grid), t64(np.full(256, m)), t64(np.full(256, np.log(s)))
        )
        assert np.exp(ll.numpy()).sum() == pytest.approx(1.0, abs=1e-9)


# -- model posterior and losses --------------------------------------------------------------


@pytest.mark.parametrize("schedule,T", [("linear", 1000), ("cosine", 1000), ("linear", 250)])
def test_vlb_and_losses_for_a_known_output(rng, schedule, T):
    diffusion = create_diffusion(noise_schedule=schedule, num_timesteps=T)
    betas = beta_schedule(schedule, T)
    B, C = 6, 2
    x0 = np.clip(rng.normal(scale=0.6, size=(B, C, 4, 4)), -1, 1)
    noise = rng.normal(size=x0.shape)
    t = np.array([0, 0, 1, 7, T // 2, T - 1])
    eps_hat, v = noise + 0.3 * rng.normal(size=x0.shape), rng.uniform(-1, 1, size=x0.shape)
    model_out = np.concatenate([eps_hat, v], axis=1)
    x_t = diffusion.q_sample(t64(x0), t64(t), t64(noise))

    vlb = diffusion.vlb_terms(t64(model_out), t64(x0), x_t, t64(t)).numpy()
    np.testing.assert_allclose(vlb, ref_vlb_bits(betas, model_out, x0, x_t.numpy(), t), rtol=1e-8)

    out = t64(model_out).requires_grad_()
    terms = diffusion.losses(out, t64(x0), x_t, t64(t), t64(noise))
    assert all(terms[k].shape == (B,) for k in ("mse", "vlb", "loss"))
    np.testing.assert_allclose(terms["mse"].detach().numpy(), ((noise - eps_hat) ** 2).mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(terms["vlb"].detach().numpy(), vlb * T / 1000, rtol=1e-12)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), (terms["mse"] + terms["vlb"]).detach().numpy())

    # The VLB trains only the variance channels: the mean is behind a stop-gradient.
    (grad,) = torch.autograd.grad(terms["vlb"].sum(), out)
    assert torch.all(grad[:, :C] == 0) and grad[:, C:].abs().sum() > 0
    (grad,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(grad[:, C:] == 0) and grad[:, :C].abs().sum() > 0


def test_learned_variance_interpolates_between_posterior_and_beta(rng):
    diffusion = create_diffusion()
    betas = ref_linear_betas(1000)
    x_t, eps = rng.normal(size=(3, 1, 2, 2)), rng.normal(size=(3, 1, 2, 2))
    t = np.array([0, 5, 999])
    _, _, min_log = ref_posterior(betas, x_t, x_t, t)
    max_log = np.broadcast_to(np.log(betas[t]).reshape(-1, 1, 1, 1), x_t.shape)
    for v, expected in [(-1.0, min_log), (1.0, max_log), (0.0, (min_log + max_log) / 2)]:
        out = np.concatenate([eps, np.full_like(eps, v)], axis=1)
        got = diffusion.p_mean_variance(t64(out), t64(x_t), t64(t))["log_variance"].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_fixed_variance_model(rng):
    diffusion = create_diffusion(learn_sigma=False)
    betas = ref_linear_betas(1000)
    x0, noise = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
    t = np.array([0, 1, 300, 999])
    x_t = diffusion.q_sample(t64(x0), t64(t), t64(noise))
    eps_hat = rng.normal(size=x0.shape)
    out = diffusion.p_mean_variance(t64(eps_hat), x_t, t64(t))
    _, post_var, _ = ref_posterior(betas, x0, x0, t)
    # "Large" variance: beta_t, with the posterior's t=1 value at t=0.
    expected = np.where(t == 0, ref_posterior(betas, x0, x0, np.array([1]))[1][0, 0, 0, 0], betas[t])
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].numpy(), expected, rtol=1e-12)
    terms = diffusion.losses(t64(eps_hat), t64(x0), x_t, t64(t), t64(noise))
    assert "vlb" not in terms
    np.testing.assert_allclose(terms["loss"].numpy(), ((noise - eps_hat) ** 2).mean(axis=(1, 2, 3)))
    with pytest.raises(ValueError, match="fixed-variance"):
        diffusion.losses(t64(np.concatenate([eps_hat, eps_hat], 1)), t64(x0), x_t, t64(t), t64(noise))


def test_losses_keep_float32_for_low_precision_outputs(rng):
    diffusion = create_diffusion()
    x0 = torch.randn(2, 1, 4, 4)
    t, noise = torch.tensor([0, 600]), torch.randn(2, 1, 4, 4)
    x_t = diffusion.q_sample(x0, t, noise)
    terms = diffusion.losses(torch.randn(2, 2, 4, 4).bfloat16(), x0, x_t, t, noise)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())


# -- respacing -------------------------------------------------------------------------------


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "250") == set(np.round(np.linspace(0, 999, 250)).astype(int).tolist())
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    for lo, hi, count in [(0, 100, 10), (100, 200, 15), (200, 300, 20)]:
        kept = [s for s in sections if lo <= s < hi]
        assert len(kept) == count and kept[0] == lo and kept[-1] == hi - 1
    assert space_timesteps(1000, "1000") == set(range(1000))


@pytest.mark.parametrize("bad", ["ddim999", "ddimx", "fast", "1001", "0", "10,,5"])
def test_bad_respacing_names_the_value(bad):
    with pytest.raises(UserError, match="timestep_respacing"):
        space_timesteps(1000, bad)


@pytest.mark.parametrize("spacing", ["250", "ddim20", "10,15,20"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_alphas_cumprod_equal_the_original_at_kept_steps(spacing, schedule):
    base = create_diffusion(noise_schedule=schedule)
    spaced = create_diffusion(timestep_respacing=spacing, noise_schedule=schedule)
    assert isinstance(spaced, SpacedDiffusion)
    kept = sorted(space_timesteps(1000, spacing))
    assert spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-10)
    t = torch.arange(spaced.num_timesteps)
    assert spaced.model_timesteps(t).tolist() == kept


def test_the_full_chain_is_not_respaced():
    full = create_diffusion()
    assert type(full) is GaussianDiffusion and full.num_timesteps == 1000


# -- samplers --------------------------------------------------------------------------------


def oracle_eps_model(x0, learn_sigma):
    """Returns the exact noise that turns x0 into x_t, given the *original* timestep."""
    abar, _ = ref_tables(ref_linear_betas(1000))
    abar = torch.from_numpy(abar)

    def model_fn(x, t):
        ab = abar[t].reshape(-1, 1, 1, 1)
        eps = ((x.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()).to(x.dtype)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if learn_sigma else eps

    return model_fn


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_samplers_recover_x0_with_an_oracle(learn_sigma):
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model_fn = oracle_eps_model(x0, learn_sigma)
    ddim = create_diffusion("ddim20", learn_sigma=learn_sigma)
    sample = ddim.ddim_sample_loop(model_fn, x0.shape, eta=0.0, generator=1)
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)
    # Ancestral sampling too: with the true x0 every posterior mean is exact and t=0 adds no noise.
    ddpm = create_diffusion("250", learn_sigma=learn_sigma)
    sample = ddpm.p_sample_loop(model_fn, x0.shape, generator=2)
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=0)
    terms = create_diffusion(learn_sigma=learn_sigma).training_losses(model_fn, x0, torch.tensor([3, 900]))
    assert terms["mse"].max() < 1e-10


@pytest.fixture(scope="module")
def tiny_switch_dit():
    torch.manual_seed(0)
    model = build_model(model_config("switch-dit", "tiny", input_size=8, in_channels=1, num_classes=10))
    # Zero-initialised output layers and experts would make every output 0: perturb all weights so
    # the sampler runs a real network (and the timestep gate matters).
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_guided_samplers_on_tiny_switch_dit(tiny_switch_dit):
    y = torch.tensor([1, 7])
    guided = classifier_free_guidance(tiny_switch_dit, y, scale=1.5, null_class=10)
    seen = set()

    def recording_model_fn(x, t):
        seen.update(t.tolist())
        return guided(x, t)

    ddpm = create_diffusion("250")
    first = ddpm.p_sample_loop(recording_model_fn, (2, 1, 8, 8), generator=123)
    assert first.shape == (2, 1, 8, 8) and torch.isfinite(first).all()
    assert seen == set(ddpm.timestep_map.tolist())  # the model sees original timesteps
    again = ddpm.p_sample_loop(guided, (2, 1, 8, 8), generator=torch.Generator().manual_seed(123))
    assert torch.equal(first, again)
    other = ddpm.p_sample_loop(guided, (2, 1, 8, 8), generator=124)
    assert not torch.allclose(first, other)

    ddim = create_diffusion("ddim20")
    for eta in (0.0, 1.0):
        a = ddim.ddim_sample_loop(guided, (2, 1, 8, 8), eta=eta, generator=7)
        b = ddim.ddim_sample_loop(guided, (2, 1, 8, 8), eta=eta, generator=7)
        assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)


def test_guidance_mixes_eps_and_keeps_conditional_sigma(tiny_switch_dit):
    model = tiny_switch_dit
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        got = classifier_free_guidance(model, y, scale=4.0, null_class=10)(x, t)
        unguided = classifier_free_guidance(model, y, scale=1.0, null_class=10)(x, t)
    torch.testing.assert_close(got[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(got[:, 1:], cond[:, 1:])
    torch.testing.assert_close(unguided, cond)


def released_forward_with_cfg(model, x, t, y, cfg_scale, guided_channels):
    """DiT's released ``forward_with_cfg``, as the reference: the batch's second half carries the
    null class; only the first ``guided_channels`` output channels are guided."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def test_guiding_only_the_first_channels_matches_dit_forward_with_cfg():
    torch.manual_seed(1)
    model = build_model(model_config("dit", "tiny", input_size=8, in_channels=4, num_classes=10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([2, 3])
        got = classifier_free_guidance(model, y, scale=1.5, null_class=10, guided_channels=3)(x, t)
        released = released_forward_with_cfg(
            model,
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([y, torch.full_like(y, 10)]),
            1.5,
            guided_channels=3,
        )[:2]
        cond = model(x, t, y)
    torch.testing.assert_close(got, released)
    torch.testing.assert_close(got[:, 3:], cond[:, 3:])  # channel 3 and sigma: conditional
    with pytest.raises(ValueError, match="guided_channels"):
        mix_guidance(cond, cond, 1.5, guided_channels=9)
