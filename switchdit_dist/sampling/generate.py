"""Class-conditional sampling for evaluation: one call from a loaded model to images.

Kept separate from the metrics so they can be tested (and used on samples from anywhere)
without a model, and so the sampler choice lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchdit_dist.errors import UserError

SAMPLERS = ("ddpm", "ddim")


@dataclass
class SamplingConfig:
    steps: int = 50
    sampler: str = "ddim"  # ddpm (ancestral, respaced to `steps`) or ddim (eta 0)
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = 256
    num_timesteps: int = 1000  # of the training chain
    noise_schedule: str = "linear"
    clip_denoised: bool = True  # pixel-space models (the digits demo): predictions of x_0 lie in [-1, 1]

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 1 <= self.steps <= self.num_timesteps:
            raise UserError(f"steps must be in [1, {self.num_timesteps}], got {self.steps}")
        if self.cfg_scale < 1.0:
            raise UserError(f"cfg scale must be >= 1 (1 disables guidance), got {self.cfg_scale}")

    @property
    def respacing(self) -> str:
        return f"ddim{self.steps}" if self.sampler == "ddim" else str(self.steps)


@torch.no_grad()
def sample_class_conditional(
    model: torch.nn.Module, labels: torch.Tensor, config: SamplingConfig, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Samples [N, C, H, W] for ``labels`` [N], guided by the model's null class.

    Noise comes from one generator seeded with ``config.seed`` and is drawn batch after batch, so
    a given seed, batch size and device reproduce the same images.
    """
    from switchdit_dist.diffusion import classifier_free_guidance, create_diffusion

    model_config = model.config
    diffusion = create_diffusion(
        timestep_respacing=config.respacing,
        noise_schedule=config.noise_schedule,
        learn_sigma=model_config.learn_sigma,
        num_timesteps=config.num_timesteps,
    )
    model = model.eval().to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    shape = (model_config.in_channels, model_config.input_size, model_config.input_size)
    loop = diffusion.ddim_sample_loop if config.sampler == "ddim" else diffusion.p_sample_loop
    chunks = []
    for batch_labels in labels.to(device).split(config.batch_size):
        model_fn = classifier_free_guidance(
            model, batch_labels, config.cfg_scale, null_class=model_config.num_classes
        )
        chunks.append(
            loop(
                model_fn,
                (len(batch_labels), *shape),
                generator=generator,
                device=device,
                clip_denoised=config.clip_denoised,
            ).cpu()
        )
    return torch.cat(chunks)
