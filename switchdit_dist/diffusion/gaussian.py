"""Gaussian diffusion (DDPM with improved-DDPM's learned variance), epsilon prediction.

All schedule tables are float64 numpy arrays; every computation on them runs in float64 and
results are cast back to the dtype of the input they belong to, so float32/bf16 callers get
their own dtype while the closed forms keep full precision.

Losses take the *model output* rather than the model: the trainer runs the network itself
(Switch-DiT also returns gate probabilities for its prior loss), then calls :meth:`losses`.
The model sees ``model_timesteps(t)``; for a plain diffusion that is ``t`` itself, a respaced
one maps back to the original 0..T-1 indices (see ``respace.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from switchdit_dist.diffusion import sampling
from switchdit_dist.diffusion.distributions import discretized_gaussian_log_likelihood, mean_flat, normal_kl

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t, model_timesteps) -> output``: the network with its conditioning bound in."""
LN2 = float(np.log(2.0))


class GaussianDiffusion:
    """Forward process, posterior, model posterior p(x_{t-1}|x_t), losses and samplers.

    ``learn_sigma``: the model outputs 2C channels, epsilon then v in [-1, 1], and the
    log-variance interpolates between the clipped posterior log-variance (v=-1) and log beta
    (v=+1). Otherwise the model outputs C channels and the variance is fixed: beta_t
    ("large", DiT's choice) or the posterior variance (``sigma_small``).
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, sigma_small: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(
                f"betas must be a 1-D array of at least 2 values in (0, 1], got shape {betas.shape}"
            )
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t=0, so the log is clipped by
        # repeating the t=1 value there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)

        # Fixed "large" variance: beta_t, except at t=0 where the posterior's t=1 value gives a
        # better decoder likelihood.
        large = np.append(self.posterior_variance[1], betas[1:])
        if sigma_small:
            self.fixed_variance, self.fixed_log_variance = (
                self.posterior_variance,
                self.posterior_log_variance_clipped,
            )
        else:
            self.fixed_variance, self.fixed_log_variance = large, np.log(large)

    # -- timesteps ---------------------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the network is conditioned on (identity here, see SpacedDiffusion)."""
        return t

    @property
    def output_channels_factor(self) -> int:
        return 2 if self.learn_sigma else 1

    # -- forward process ---------------------------------------------------------------------

    def _gather(self, table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """table[t] as float64 on t's device, shaped [B, 1, ..., 1] to broadcast over ``ndim`` dims.
        Each table is copied to a device once: a host-to-device copy per call would block the
        host (a sync) several times in every training step."""
        key = (id(table), t.device)  # the tables are this object's attributes: ids are stable
        values = self._device_tables.get(key)
        if values is None:
            values = self._device_tables[key] = torch.from_numpy(table).to(t.device)
        return values[t.long()].reshape(-1, *([1] * (ndim - 1)))

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = self._gather(self.sqrt_alphas_cumprod, t, n) * x_start
        variance = self._gather(self.one_minus_alphas_cumprod, t, n).expand_as(mean)
        log_variance = self._gather(self.log_one_minus_alphas_cumprod, t, n).expand_as(mean)
        return mean.to(x_start.dtype), variance.to(x_start.dtype), log_variance.to(x_start.dtype)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} must equal x_start shape {tuple(x_start.shape)}"
            )
        n = x_start.ndim
        x_t = (
            self._gather(self.sqrt_alphas_cumprod, t, n) * x_start
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, n) * noise
        )
        return x_t.to(x_start.dtype)

    def _posterior64(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        n = x_t.ndim
        coef1 = self._gather(self.posterior_mean_coef1, t, n)
        mean = coef1 * x_start + self._gather(self.posterior_mean_coef2, t, n) * x_t
        variance = self._gather(self.posterior_variance, t, n).expand_as(mean)
        log_variance = self._gather(self.posterior_log_variance_clipped, t, n).expand_as(mean)
        return mean, variance, log_variance

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} must equal x_t shape {tuple(x_t.shape)}")
        return tuple(v.to(x_t.dtype) for v in self._posterior64(x_start, x_t, t))

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        x_start = (
            self._gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, n) * eps
        )
        return x_start.to(x_t.dtype)

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor
    ) -> torch.Tensor:
        n = x_t.ndim
        eps = (self._gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, n
        )
        return eps.to(x_t.dtype)

    # -- model posterior ---------------------------------------------------------------------

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(eps, v) from the network output; v is None for a fixed-variance diffusion."""
        channels = x_t.shape[1]
        expected = (x_t.shape[0], channels * self.output_channels_factor, *x_t.shape[2:])
        if tuple(model_output.shape) != expected:
            kind = "learned-sigma (2C channels)" if self.learn_sigma else "fixed-variance (C channels)"
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not fit a {kind} diffusion "
                f"with x_t of shape {tuple(x_t.shape)}: expected {expected}"
            )
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def p_mean_variance64(self, model_output, x_t, t, clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`p_mean_variance` kept in float64 (for the losses and the samplers' arithmetic)."""
        eps, v = self.split_output(model_output, x_t)
        n = x_t.ndim
        x_t64 = x_t.double()
        if v is not None:
            min_log = self._gather(self.posterior_log_variance_clipped, t, n)
            max_log = self._gather(self.log_betas, t, n)
            frac = (v.double() + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            log_variance = self._gather(self.fixed_log_variance, t, n).expand_as(x_t64)
        pred_xstart = (
            self._gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t64
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, n) * eps.double()
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self._posterior64(pred_xstart, x_t64, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network output: ``mean``, ``variance``, ``log_variance``,
        ``pred_xstart`` (clamped to [-1, 1] if ``clip_denoised``), all in x_t's dtype."""
        out = self.p_mean_variance64(model_output, x_t, t, clip_denoised)
        return {k: v.to(x_t.dtype) for k, v in out.items()}

    # -- losses ------------------------------------------------------------------------------

    def vlb_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VLB term in bits per dim, float64: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, the discretised Gaussian negative log-likelihood of x_0 at t = 0."""
        x_start64 = x_start.double()
        true_mean, _, true_log_variance = self._posterior64(x_start64, x_t.double(), t)
        out = self.p_mean_variance64(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / LN2
        decoder_nll = (
            -mean_flat(discretized_gaussian_log_likelihood(x_start64, out["mean"], 0.5 * out["log_variance"]))
            / LN2
        )
        return torch.where(t == 0, decoder_nll, kl)

    def losses(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample [B] training losses from a network output (improved DDPM's hybrid loss).

        ``mse``: mean over dims of (noise - eps_hat)^2. ``vlb`` (learned sigma only): the VLB
        term with the predicted mean detached, so it trains only the variance channels, scaled
        by T/1000 (1 for the default T=1000). ``loss``: mse + vlb. Returned in float32, or in
        float64 for a float64 model output.
        """
        out_dtype = torch.promote_types(model_output.dtype, torch.float32)
        eps, v = self.split_output(model_output, x_t)
        mse = mean_flat((noise.to(out_dtype) - eps.to(out_dtype)) ** 2)
        terms = {"mse": mse}
        if v is not None:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vlb = self.vlb_terms(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
            terms["vlb"] = vlb.to(out_dtype)
            terms["loss"] = mse + terms["vlb"]
        else:
            terms["loss"] = mse
        return terms

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Convenience for models that return only their output: noise, run, :meth:`losses`."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        return self.losses(model_fn(x_t, self.model_timesteps(t)), x_start, x_t, t, noise)

    # -- one reverse step (the loops, noise and generators live in sampling.py) -------------

    def p_sample_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Ancestral step x_{t-1} = mean + sigma * noise; no noise where t == 0 (or noise is None)."""
        out = self.p_mean_variance64(model_output, x_t, t, clip_denoised)
        x_prev = out["mean"]
        if noise is not None:
            keep = (t != 0).double().reshape(-1, *([1] * (x_t.ndim - 1)))
            x_prev = x_prev + keep * torch.exp(0.5 * out["log_variance"]) * noise.double()
        return x_prev.to(x_t.dtype)

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's
        posterior variance. The learned variance channels, if any, are ignored."""
        out = self.p_mean_variance64(model_output, x_t, t, clip_denoised)
        n = x_t.ndim
        x_start = out["pred_xstart"]
        # Recomputed from x_0 so that clipping x_0 is reflected in eps too.
        eps = (self._gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t.double() - x_start) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, n
        )
        abar = self._gather(self.alphas_cumprod, t, n)
        abar_prev = self._gather(self.alphas_cumprod_prev, t, n)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x_prev = torch.sqrt(abar_prev) * x_start + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        if noise is not None and eta > 0:
            keep = (t != 0).double().reshape(-1, *([1] * (n - 1)))
            x_prev = x_prev + keep * sigma * noise.double()
        return x_prev.to(x_t.dtype)

    # -- samplers ----------------------------------------------------------------------------

    def p_sample_loop(self, model_fn: ModelFn, shape, **kwargs) -> torch.Tensor:
        """Ancestral DDPM sampling from pure noise; keyword arguments as in
        :func:`switchdit_dist.diffusion.sampling.p_sample_loop`."""
        return sampling.p_sample_loop(self, model_fn, shape, **kwargs)

    def ddim_sample_loop(self, model_fn: ModelFn, shape, **kwargs) -> torch.Tensor:
        """DDIM sampling; keyword arguments as in
        :func:`switchdit_dist.diffusion.sampling.ddim_sample_loop`."""
        return sampling.ddim_sample_loop(self, model_fn, shape, **kwargs)
