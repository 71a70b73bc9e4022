"""Validation loss on held-out shards at fixed timesteps and fixed noise.

The batches, their timesteps and their noise are drawn once, from generators seeded by
(seed, rank, batch), so every evaluation — in this run, after a resume, or in another run with the
same seed and world size — scores the same noisy inputs and the curves are directly comparable.
The score is the training objective (``step.py``) in eval mode, without label dropout: the
diffusion loss per timestep bucket and, for Switch-DiT, the prior loss, its unit matching seeded
from the run's seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from switchdit_dist.train import comm
from switchdit_dist.train.metrics import NUM_BUCKETS, timestep_bucket
from switchdit_dist.train.seeding import derive_seed
from switchdit_dist.train.step import Draws, Objective


@dataclass
class FixedBatch:
    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


class Validator:
    def __init__(
        self,
        data_config,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        max_batches: int,
        num_timesteps: int,
        seed: int,
    ):
        from switchdit_dist.data.config import validation_config
        from switchdit_dist.data.loader import LatentLoader

        loader = LatentLoader(
            validation_config(data_config), batch_size=batch_size, rank=rank, world_size=world_size
        )
        count = min(loader.steps_per_epoch, max_batches)
        self.num_timesteps = num_timesteps
        self.seed = seed
        self.batches: list[FixedBatch] = []
        batches = iter(loader)
        for index in range(count):
            batch = next(batches)
            gen = torch.Generator().manual_seed(derive_seed(seed, rank, index, 3))
            n = batch.latent.shape[0]
            # Timesteps spread evenly over [0, T) across the set, offset per batch.
            t = (
                (torch.arange(n) * num_timesteps) // n + torch.randint(0, num_timesteps, (1,), generator=gen)
            ) % num_timesteps
            self.batches.append(
                FixedBatch(
                    batch.latent.float(), batch.cls.long(), t, torch.randn(batch.latent.shape, generator=gen)
                )
            )

    @classmethod
    def of_batches(cls, batches: list[FixedBatch], *, num_timesteps: int, seed: int) -> Validator:
        """A validator of batches already drawn (tests, or scoring another set)."""
        validator = cls.__new__(cls)
        validator.batches, validator.num_timesteps, validator.seed = list(batches), num_timesteps, seed
        return validator

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, objective: Objective) -> dict[str, float | None]:
        """``module``: the network itself (validation needs no engine); the record is equal on every rank."""
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        # loss per bucket, samples per bucket, prior loss x samples: one float64 tensor, one all-reduce
        sums = torch.zeros(2 * NUM_BUCKETS + 1, dtype=torch.float64, device=device)
        loss_sum, count, prior_sum = sums[:NUM_BUCKETS], sums[NUM_BUCKETS:-1], sums[-1:]
        try:
            plans = None
            if self.batches:
                rng = np.random.default_rng(derive_seed(self.seed, 4))
                plans = objective.plan(module, [b.t for b in self.batches], rng)
            for i, b in enumerate(self.batches):
                batch = objective.inputs(b.x0, b.y, Draws(b.t, b.noise), device)
                terms = objective(module, batch, None if plans is None else plans[i])
                loss = terms.per_sample["loss"].double()
                bucket = timestep_bucket(batch.t, self.num_timesteps)
                loss_sum.index_add_(0, bucket, loss)
                count.index_add_(0, bucket, torch.ones_like(loss))
                if terms.prior is not None:
                    prior_sum += terms.prior.double() * loss.numel()
        finally:
            module.train(was_training)
        comm.all_reduce_sum([sums])
        values = sums.tolist()
        loss_sum, count, prior_sum = values[:NUM_BUCKETS], values[NUM_BUCKETS:-1], values[-1]
        total = sum(count)
        record: dict[str, float | None] = {"val_loss": sum(loss_sum) / max(total, 1.0)}
        for i in range(NUM_BUCKETS):
            record[f"val_loss_t{i}"] = loss_sum[i] / count[i] if count[i] else None
        if objective.prior is not None:
            record["val_prior"] = prior_sum / max(total, 1.0)
        return record
