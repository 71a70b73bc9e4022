"""``create_diffusion``: the one entry point the trainer and the sampler use."""

from __future__ import annotations

from switchdit_dist.diffusion.gaussian import GaussianDiffusion
from switchdit_dist.diffusion.respace import SpacedDiffusion, space_timesteps
from switchdit_dist.diffusion.schedules import beta_schedule


def create_diffusion(
    timestep_respacing: str = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    num_timesteps: int = 1000,
    sigma_small: bool = False,
) -> GaussianDiffusion:
    """The full chain when ``timestep_respacing`` is empty (its tables are then exactly the
    schedule's), otherwise a :class:`SpacedDiffusion` over the kept steps."""
    betas = beta_schedule(noise_schedule, num_timesteps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, sigma_small=sigma_small)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    return SpacedDiffusion(kept, betas, learn_sigma=learn_sigma, sigma_small=sigma_small)
