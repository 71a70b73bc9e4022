"""Validation loss on held-out shards at fixed timesteps and fixed noise.

The batches, their timesteps and their noise are drawn once, from generators seeded by
(seed, rank, batch), so every evaluation — in this run, after a resume, or in another run with the
same seed and world size — scores the same noisy inputs and the curves are directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from switchdit_dist.train import comm
from switchdit_dist.train.metrics import NUM_BUCKETS, timestep_bucket
from switchdit_dist.train.seeding import derive_seed


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

    @torch.no_grad()
    def evaluate(
        self, module: torch.nn.Module, diffusion, device: torch.device, dtype: torch.dtype
    ) -> dict[str, float]:
        was_training = module.training
        module.eval()
        loss_sum = torch.zeros(NUM_BUCKETS, dtype=torch.float64)
        count = torch.zeros(NUM_BUCKETS, dtype=torch.float64)
        try:
            for b in self.batches:
                x0, t, noise = b.x0.to(device), b.t.to(device), b.noise.to(device)
                x_t = diffusion.q_sample(x0, t, noise)
                out = module(x_t.to(dtype), t, b.y.to(device))
                loss = diffusion.losses(out.float(), x0, x_t, t, noise)["loss"].double().cpu()
                bucket = timestep_bucket(b.t, self.num_timesteps)
                loss_sum.index_add_(0, bucket, loss)
                count.index_add_(0, bucket, torch.ones_like(loss))
        finally:
            module.train(was_training)
        comm.all_reduce_sum([loss_sum, count])
        record = {"val_loss": (loss_sum.sum() / count.sum().clamp(min=1)).item()}
        for i in range(NUM_BUCKETS):
            record[f"val_loss_t{i}"] = (loss_sum[i] / count[i]).item() if count[i] else None
        return record
