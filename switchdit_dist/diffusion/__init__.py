"""Gaussian diffusion for DiT / Switch-DiT: schedules, losses, respacing, DDPM/DDIM samplers, guidance."""

from switchdit_dist.diffusion.factory import create_diffusion
from switchdit_dist.diffusion.gaussian import GaussianDiffusion, ModelFn
from switchdit_dist.diffusion.guidance import classifier_free_guidance, mix_guidance
from switchdit_dist.diffusion.respace import SpacedDiffusion, space_timesteps
from switchdit_dist.diffusion.sampling import ddim_sample_loop, p_sample_loop
from switchdit_dist.diffusion.schedules import NOISE_SCHEDULES, beta_schedule

__all__ = [
    "NOISE_SCHEDULES",
    "GaussianDiffusion",
    "ModelFn",
    "SpacedDiffusion",
    "beta_schedule",
    "classifier_free_guidance",
    "create_diffusion",
    "ddim_sample_loop",
    "mix_guidance",
    "p_sample_loop",
    "space_timesteps",
]
