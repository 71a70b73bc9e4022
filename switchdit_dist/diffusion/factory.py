"""``create_diffusion``: the one entry point the trainer and the sampler use."""

from __future__ import annotations

from dataclasses import dataclass

from switchdit_dist.diffusion.gaussian import GaussianDiffusion
from switchdit_dist.diffusion.respace import SpacedDiffusion, space_timesteps
from switchdit_dist.diffusion.schedules import beta_schedule


@dataclass
class DiffusionConfig:
    """Training uses the full chain (``timestep_respacing=""``); sampling typically "250" or "ddim50"."""

    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool = True
    sigma_small: bool = False
    timestep_respacing: str = ""

    def build(self) -> GaussianDiffusion:
        return create_diffusion(
            timestep_respacing=self.timestep_respacing,
            noise_schedule=self.noise_schedule,
            learn_sigma=self.learn_sigma,
            num_timesteps=self.num_timesteps,
            sigma_small=self.sigma_small,
        )


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
