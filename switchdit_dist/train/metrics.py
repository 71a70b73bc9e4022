"""Training metrics: accumulated over a logging interval, reduced over ranks, written by rank 0 to
``metrics.jsonl`` (one JSON line per logged step), TensorBoard and a progress bar."""

from __future__ import annotations

import io
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from switchdit_dist.train import comm

NUM_BUCKETS = 10


def timestep_bucket(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Index of the timestep's tenth of [0, T): the buckets of loss_t0 .. loss_t9."""
    return (t.long().cpu() * NUM_BUCKETS // num_timesteps).clamp(max=NUM_BUCKETS - 1)


class IntervalStats:
    """Sums over the steps since the last log line; reduced across ranks at log time."""

    def __init__(self, num_timesteps: int, num_blocks: int, num_experts: int):
        self.num_timesteps = num_timesteps
        self.num_blocks, self.num_experts = num_blocks, num_experts
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "mse": 0.0, "vlb": 0.0, "prior": 0.0}
        self.samples = 0
        self.micro_steps = 0
        self.steps = 0
        self.bucket_loss = torch.zeros(NUM_BUCKETS, dtype=torch.float64)
        self.bucket_count = torch.zeros(NUM_BUCKETS, dtype=torch.float64)
        self.route_count = torch.zeros(max(self.num_blocks, 1), max(self.num_experts, 1), dtype=torch.float64)
        self.data_wait = 0.0
        self.compute = 0.0

    def add_micro(self, per_sample: dict[str, torch.Tensor], prior: float, t: torch.Tensor, routes) -> None:
        n = per_sample["loss"].numel()
        for key in ("loss", "mse", "vlb"):
            self.sums[key] += float(per_sample[key].detach().double().sum())
        self.sums["prior"] += prior * n
        self.samples += n
        self.micro_steps += 1
        bucket = timestep_bucket(t, self.num_timesteps)
        self.bucket_loss.index_add_(0, bucket, per_sample["loss"].detach().double().cpu())
        self.bucket_count.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
        if routes is not None:  # [B, N, k] expert indices
            one_hot = torch.zeros(routes.shape[0], self.num_blocks, self.num_experts, dtype=torch.float64)
            one_hot.scatter_(2, routes.cpu().long(), 1.0)
            self.route_count += one_hot.sum(0)

    def reduce(self) -> dict[str, Any]:
        scalars = torch.tensor(
            [self.sums["loss"], self.sums["mse"], self.sums["vlb"], self.sums["prior"], float(self.samples)],
            dtype=torch.float64,
        )
        tensors = [scalars, self.bucket_loss.clone(), self.bucket_count.clone(), self.route_count.clone()]
        comm.all_reduce_sum(tensors)
        scalars, bucket_loss, bucket_count, route_count = tensors
        total = max(scalars[4].item(), 1.0)
        out = {
            "loss": scalars[0].item() / total,
            "mse": scalars[1].item() / total,
            "vlb": scalars[2].item() / total,
            "prior": scalars[3].item() / total,
        }
        for i in range(NUM_BUCKETS):
            c = bucket_count[i].item()
            out[f"loss_t{i}"] = bucket_loss[i].item() / c if c else math.nan
        if self.num_experts > 1:
            # fraction of samples routed to each expert, per block (sums to top_k over experts)
            out["route_frac"] = (route_count / total).tolist()
        out["samples"] = int(scalars[4].item())
        return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gate_image(gate_probs: torch.Tensor):
    """[T, N, E] router probabilities -> an RGB uint8 array [H, W, 3]: one band per block, one row
    per expert, one column per timestep (t=0 on the left), brighter = more probable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    T, N, E = gate_probs.shape
    rows = []
    for block in range(N):
        rows.append(gate_probs[:, block, :].T.float().numpy())  # [E, T]
        if block < N - 1:
            rows.append(np.full((1, T), np.nan))
    grid = np.concatenate(rows, axis=0)
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.22 * grid.shape[0]), dpi=80)
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xlabel("timestep t")
    ax.set_yticks([b * (E + 1) + (E - 1) / 2 for b in range(N)])
    ax.set_yticklabels([f"block {b}" for b in range(N)])
    ax.set_title("router probability per expert (rows) over timesteps")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


class MetricsWriter:
    """Rank 0's sinks. Other ranks get a no-op instance."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # NaN (an empty timestep bucket) becomes null: strict JSON for every reader.
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        line = {"step": step, **clean, "time": time.time()}
        self.jsonl.write(json.dumps(line) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                    tag = f"loss_by_t/{key}" if key.startswith("loss_t") else f"train/{key}"
                    self.tb.add_scalar(tag, value, step)
            for block, fractions in enumerate(record.get("route_frac", [])):
                for expert, frac in enumerate(fractions):
                    self.tb.add_scalar(f"routing/block{block:02d}/expert{expert}", frac, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record.get('img_per_s', 0):.1f}")

    def log_validation(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "validation.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if value is not None:
                    self.tb.add_scalar(f"val/{key}", value, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image(self, tag: str, array, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, array, step, dataformats="HWC")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
