"""One training step of DiT and Switch-DiT, shared by the trainer, validation and `switchdit bench train`.

A step is made of three parts, in this order:

1. ``draw``: the random inputs of a micro-batch (timesteps, noise, label dropout) from a generator
   the caller seeds, on the host. Nothing in the step draws from a global generator.
2. ``Objective.plan``: Switch-DiT's gate sees only the timestep, so once the step's timesteps are
   drawn the routes of every block are known, and so are the samples per expert that the
   expert-parallel layers exchange and the diffusion prior's unit matching (Hungarian, on the gate
   pattern of all T timesteps). The plan computes them once per step, before any forward, with a
   single device-to-host copy: the step's one wait for the device.
3. ``Objective.__call__``: the forward and loss of one micro-batch: the hybrid diffusion loss (MSE +
   VLB) plus ``prior_loss_weight`` x the prior loss. The results stay on the device; the caller
   reads them at logging steps only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.prior import DiffusionPriorLoss, jensen_shannon, match_units
from switchdit_dist.models.registry import is_moe
from switchdit_dist.models.switch_dit import Routes
from switchdit_dist.train import comm


@dataclass
class Draws:
    """The random inputs of one micro-batch, on the host."""

    t: torch.Tensor  # [B] int64 timesteps
    noise: torch.Tensor  # [B, C, H, W] float32
    drop: torch.Tensor | None = None  # [B] bool: samples trained with the null class; None: no dropout


def draw(
    generator: torch.Generator,
    batch: int,
    latent_shape: Sequence[int],
    num_timesteps: int,
    dropout_prob: float = 0.0,
) -> Draws:
    """Timesteps, then noise, then the label-dropout mask, all from ``generator``."""
    t = torch.randint(0, num_timesteps, (batch,), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    drop = torch.rand(batch, generator=generator) < dropout_prob if dropout_prob > 0 else None
    return Draws(t, noise, drop)


@dataclass
class MicroBatch:
    """A micro-batch's inputs on the model's device; ``y`` already holds the null class where dropped."""

    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


@dataclass
class MicroPlan:
    """What the plan decided for one micro-batch."""

    routes: Routes
    route_counts: torch.Tensor  # [depth, E] int64, host: this rank's samples per expert and block
    prior_target: torch.Tensor | None  # [B, depth*E] on the device: matched prior rows, each summing to 1


@dataclass
class Terms:
    """One micro-batch's objective. ``loss`` carries the gradient; the rest is detached."""

    loss: torch.Tensor  # scalar: mean diffusion loss + prior weight x prior loss
    per_sample: dict[str, torch.Tensor]  # [B] diffusion terms: loss (mse + vlb), mse, vlb
    prior: torch.Tensor | None  # scalar prior loss (None without a prior)


class Objective:
    """Hybrid diffusion loss plus, for Switch-DiT with ``prior_loss_weight > 0``, the diffusion prior loss.

    ``input_dtype`` is the dtype the network takes its noisy input in (bf16 when the weights are
    bf16, as under DeepSpeed's bf16 mode); losses are computed in float32 or wider.
    """

    def __init__(self, diffusion, model_config: DiTConfig, input_dtype: torch.dtype = torch.float32):
        self.diffusion = diffusion
        self.model_config = model_config
        self.input_dtype = input_dtype
        self.is_moe = is_moe(model_config)
        self.prior_weight = model_config.prior_loss_weight if self.is_moe else 0.0
        self.prior = None
        if self.is_moe and self.prior_weight > 0:
            self.prior = DiffusionPriorLoss(
                model_config.depth, model_config.num_experts, model_config.top_k, diffusion.num_timesteps
            )

    # --- inputs --------------------------------------------------------------------------------

    def inputs(self, x0: torch.Tensor, y: torch.Tensor, draws: Draws, device: torch.device) -> MicroBatch:
        """Host tensors -> a ``MicroBatch`` on ``device``. Label dropout is applied on the host, and the
        copies do not wait for the device (a copy from pageable memory is staged before it returns)."""
        if x0.shape[0] != draws.t.shape[0]:
            raise ValueError(f"a micro-batch of {x0.shape[0]} samples got draws for {draws.t.shape[0]}")
        if draws.drop is not None:
            # The label embedder's extra row: the null class of classifier-free guidance.
            y = torch.where(draws.drop, torch.full_like(y, self.model_config.num_classes), y)

        def move(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return tensor.to(device, dtype, non_blocking=True)

        return MicroBatch(move(x0, torch.float32), move(y, torch.long), move(draws.t), move(draws.noise))

    # --- once per step -------------------------------------------------------------------------

    @torch.no_grad()
    def plan(
        self, module: torch.nn.Module, timesteps: Sequence[torch.Tensor], rng: np.random.Generator
    ) -> list[MicroPlan] | None:
        """Routes, expert-parallel sample counts and prior targets of every micro-batch of a step.

        ``module``: the network (not a wrapper); ``timesteps``: each micro-batch's [B] host timesteps,
        in the order the micro-batches run (expert-parallel peers run theirs in the same order);
        ``rng``: the prior matching's tie-breaking permutations. None for a dense model.

        With expert-parallel layers every rank of the EP group must call this at the same point, with
        the same number of micro-batches: their counts are summed over the group.
        """
        if not self.is_moe:
            return None
        from switchdit_dist.moe.layer import expert_parallel_layout

        cfg = self.model_config
        depth, num_experts = cfg.depth, cfg.num_experts
        device = next(module.parameters()).device
        num_timesteps = self.diffusion.num_timesteps
        table = module.route_table(torch.arange(num_timesteps, device=device))  # [T, N, k]
        t = torch.stack(list(timesteps)).to(device, non_blocking=True)  # [M, B]
        index = table[t]  # [M, B, N, k]
        # This rank's samples per expert, per micro-batch and block: [M, N, E], counted on the device.
        pairs = index.transpose(1, 2).reshape(t.shape[0], depth, -1)
        counts = torch.zeros(t.shape[0], depth, num_experts, dtype=torch.long, device=device)
        counts.scatter_add_(2, pairs, torch.ones_like(pairs))
        layout = expert_parallel_layout(module)
        ep_size, ep_rank = (layout[0], layout[1]) if layout is not None else (1, 0)
        group_counts = counts.new_zeros((ep_size, *counts.shape))
        group_counts[ep_rank] = counts
        if ep_size > 1:
            # Every peer's counts, so each layer knows what it receives without exchanging them.
            comm.all_reduce_sum([group_counts], group=layout[2])
        pieces = [group_counts.reshape(-1)] + ([table.reshape(-1)] if self.prior is not None else [])
        host = torch.cat(pieces).cpu()  # the step's one wait for the device
        group_counts = host[: group_counts.numel()].view(group_counts.shape)  # [ep, M, N, E]
        targets = [None] * len(timesteps)
        if self.prior is not None:
            host_table = host[group_counts.numel() :].view(table.shape)
            targets = self._prior_targets(host_table, timesteps, rng, device)
        return [
            MicroPlan(
                routes=Routes(
                    index=index[m],
                    expert_counts=None if layout is None else [group_counts[:, m, n] for n in range(depth)],
                ),
                route_counts=group_counts[ep_rank, m],
                prior_target=targets[m],
            )
            for m in range(len(timesteps))
        ]

    def _prior_targets(
        self,
        table: torch.Tensor,
        timesteps: Sequence[torch.Tensor],
        rng: np.random.Generator,
        device: torch.device,
    ) -> list[torch.Tensor]:
        """Match units on the all-timestep gate pattern (host), then each micro-batch's prior rows."""
        num_timesteps, depth, _ = table.shape
        num_experts = self.model_config.num_experts
        pattern = torch.zeros(num_timesteps, depth, num_experts).scatter_(2, table, 1.0).flatten(1)
        assignment = match_units(pattern.numpy(), self.prior.prior, rng)
        matched = torch.from_numpy(self.prior.prior[:, assignment])  # [T, N*E]
        targets = []
        for t in timesteps:
            rows = matched[t.long()]
            targets.append((rows / rows.sum(-1, keepdim=True)).to(device, non_blocking=True))
        return targets

    # --- one micro-batch -----------------------------------------------------------------------

    def __call__(self, forward: Callable, batch: MicroBatch, plan: MicroPlan | None) -> Terms:
        """``forward``: the network or what wraps it (a DeepSpeed engine, a compiled module)."""
        x_t = self.diffusion.q_sample(batch.x0, batch.t, batch.noise)
        model_in = x_t.to(self.input_dtype)
        gates = None
        if plan is None:
            out = forward(model_in, batch.t, batch.y)
        elif self.prior is not None:
            out, gates = forward(model_in, batch.t, batch.y, return_gates=True, routes=plan.routes)
        else:
            out = forward(model_in, batch.t, batch.y, routes=plan.routes)
        per_sample = self.diffusion.losses(out.float(), batch.x0, x_t, batch.t, batch.noise)
        loss = per_sample["loss"].mean()
        prior = None
        if gates is not None:
            gate_dist = gates.float().flatten(1) / self.model_config.depth
            prior = jensen_shannon(gate_dist, plan.prior_target).mean()
            loss = loss + self.prior_weight * prior
            prior = prior.detach()
        return Terms(loss, {k: v.detach() for k, v in per_sample.items()}, prior)
