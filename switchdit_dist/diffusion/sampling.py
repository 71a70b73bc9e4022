"""Sampling loops: DDPM ancestral and DDIM, from pure noise down to t = 0.

The per-step arithmetic is on the diffusion (``p_sample_step``, ``ddim_step``); this module owns
the loop, the noise and its generator. Every random draw comes from one generator, so a given
seed (or generator state) reproduces the samples exactly on the same device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from switchdit_dist.diffusion.gaussian import GaussianDiffusion, ModelFn

GeneratorLike = torch.Generator | int | None


def make_generator(generator: GeneratorLike, device: torch.device) -> torch.Generator | None:
    """An int is a seed for a fresh generator on ``device``; a generator is used as given."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


def run_reverse_chain(
    diffusion: GaussianDiffusion,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor],
    shape: Sequence[int],
    noise: torch.Tensor | None,
    generator: GeneratorLike,
    device: torch.device | str | None,
    progress: bool,
) -> torch.Tensor:
    """x_T from ``noise`` (or the generator), then ``step(x, t, gen)`` for t = T-1 .. 0."""
    device = torch.device(device) if device is not None else (noise.device if noise is not None else "cpu")
    gen = make_generator(generator, torch.device(device))
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(
                f"noise shape {tuple(noise.shape)} must equal the requested shape {tuple(shape)}"
            )
        x = noise.to(device)
    else:
        x = torch.randn(tuple(shape), generator=gen, device=device)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, disable=not progress, desc="sampling"):
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        x = step(x, t, gen)
    return x


def randn_like(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


@torch.no_grad()
def p_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    noise: torch.Tensor | None = None,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over all of ``diffusion``'s steps (250 for a "250"-respaced one).

    ``model_fn(x, t)`` is called with the model timesteps (original indices for a respaced
    diffusion). ``noise`` replaces the initial x_T draw; ``generator`` is a torch.Generator or
    an int seed. Samples are in the dtype of ``noise`` (float32 by default).
    """

    def step(x: torch.Tensor, t: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        out = model_fn(x, diffusion.model_timesteps(t))
        z = randn_like(x, gen) if int(t[0]) > 0 else None
        return diffusion.p_sample_step(out, x, t, z, clip_denoised)

    return run_reverse_chain(diffusion, step, shape, noise, generator, device, progress)


@torch.no_grad()
def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling over all of ``diffusion``'s steps (respace with "ddimN" for N steps);
    other arguments as in :func:`p_sample_loop`."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def step(x: torch.Tensor, t: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        out = model_fn(x, diffusion.model_timesteps(t))
        z = randn_like(x, gen) if eta > 0 and int(t[0]) > 0 else None
        return diffusion.ddim_step(out, x, t, z, eta, clip_denoised)

    return run_reverse_chain(diffusion, step, shape, noise, generator, device, progress)
