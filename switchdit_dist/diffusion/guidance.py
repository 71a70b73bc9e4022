"""Classifier-free guidance (Ho & Salimans 2022) for class-conditional models.

One batch carries the conditional and the unconditional (null class) copies of x; the epsilon
channels are mixed as ``uncond + s * (cond - uncond)`` and everything else (the learned-sigma
channels, and epsilon channels left unguided) comes from the conditional half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ClassConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mix_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, guided_channels: int
) -> torch.Tensor:
    """Guide channels [0, guided_channels) of the output; keep the conditional output elsewhere.

    Passing the number of latent channels guides all of epsilon (the paper's setting); DiT's
    released sampler guides 3 of 4.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} outputs differ in shape")
    if not 0 < guided_channels <= cond.shape[1]:
        raise ValueError(f"guided_channels must be in [1, {cond.shape[1]}], got {guided_channels}")
    n = guided_channels
    guided = uncond[:, :n] + scale * (cond[:, :n] - uncond[:, :n])
    return torch.cat([guided, cond[:, n:]], dim=1)


def classifier_free_guidance(
    model: ClassConditionalModel,
    y: torch.Tensor,
    scale: float,
    null_class: int,
    guided_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t)`` for the samplers: ``model(x, t, y)`` guided by ``model(x, t, null)``.

    Both halves run as one batch of 2B. ``guided_channels=None`` guides every latent channel
    (x's channel count). With ``scale == 1`` guidance is the identity and only the conditional
    half runs. Put the model in eval mode first: in training mode its label dropout would
    replace some labels at random.
    """
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D tensor of class ids, got shape {tuple(y.shape)}")
    null = torch.full_like(y, null_class)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but {y.shape[0]} labels were given")
        if scale == 1.0:
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return mix_guidance(cond, uncond, scale, x.shape[1] if guided_channels is None else guided_channels)

    return model_fn
