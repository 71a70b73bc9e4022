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
    """Index of the timestep's tenth of [0, T): the buckets of loss_t0 .. loss_t9 (on t's device)."""
    return (t.long() * NUM_BUCKETS // num_timesteps).clamp(max=NUM_BUCKETS - 1)


SUMS = ("loss", "mse", "vlb", "prior")


class IntervalStats:
    """Sums over the steps since the last log line; reduced across ranks at log time.

    The sums of losses stay on the device they were computed on, so a step never waits for them:
    they are read once per logging interval, in ``reduce``, with one all-reduce and one copy to
    the host. Routing counts come from the step's plan and live on the host already.
    """

    def __init__(self, num_timesteps: int, num_blocks: int, num_experts: int):
        self.num_timesteps = num_timesteps
        self.num_blocks, self.num_experts = num_blocks, num_experts
        self.device = torch.device("cpu")  # follows the losses it is given
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {
            k: torch.zeros((), dtype=torch.float64, device=self.device) for k in SUMS
        }
        self.samples = 0
        self.micro_steps = 0
        self.steps = 0
        self.bucket_loss = torch.zeros(NUM_BUCKETS, dtype=torch.float64, device=self.device)
        self.bucket_count = torch.zeros(NUM_BUCKETS, dtype=torch.float64, device=self.device)
        self.route_count = torch.zeros(max(self.num_blocks, 1), max(self.num_experts, 1), dtype=torch.float64)
        self.data_wait = 0.0
        self.compute = 0.0

    def _follow(self, device: torch.device) -> None:
        if device == self.device:
            return
        self.device = device
        self.sums = {
            k: torch.as_tensor(v, dtype=torch.float64).to(device, non_blocking=True)
            for k, v in self.sums.items()
        }
        self.bucket_loss = self.bucket_loss.to(device, non_blocking=True)
        self.bucket_count = self.bucket_count.to(device, non_blocking=True)

    def add_micro(
        self,
        per_sample: dict[str, torch.Tensor],
        prior: torch.Tensor | float | None,
        t: torch.Tensor,
        route_counts: torch.Tensor | None = None,
    ) -> None:
        """``per_sample``: the objective's [B] terms; ``prior``: the micro-batch's prior loss; ``t``: its
        timesteps, on the losses' device; ``route_counts``: [blocks, experts] samples per expert (host)."""
        loss = per_sample["loss"].detach()
        self._follow(loss.device)
        n = loss.numel()
        for key in ("loss", "mse", "vlb"):
            if key in per_sample:
                self.sums[key] = self.sums[key] + per_sample[key].detach().double().sum()
        if prior is not None:
            self.sums["prior"] = self.sums["prior"] + torch.as_tensor(prior).detach().double() * n
        self.samples += n
        self.micro_steps += 1
        bucket = timestep_bucket(t, self.num_timesteps).to(self.device, non_blocking=True)
        self.bucket_loss.index_add_(0, bucket, loss.double())
        self.bucket_count.index_add_(0, bucket, torch.ones_like(loss, dtype=torch.float64))
        if route_counts is not None:
            self.route_count += route_counts.to(torch.float64)

    def reduce(self) -> dict[str, Any]:
        """Means over every rank's samples since the last reset: one all-reduce, one read of the device."""
        scalars = torch.stack(
            [torch.as_tensor(self.sums[k], dtype=torch.float64).to(self.device) for k in SUMS]
            + [torch.tensor(float(self.samples), dtype=torch.float64, device=self.device)]
        )
        parts = [scalars, self.bucket_loss, self.bucket_count, self.route_count.to(self.device)]
        flat = torch.cat([p.reshape(-1) for p in parts])
        comm.all_reduce_sum([flat])
        values = flat.tolist()
        scalars, values = values[: len(SUMS) + 1], values[len(SUMS) + 1 :]
        bucket_loss, bucket_count = values[:NUM_BUCKETS], values[NUM_BUCKETS : 2 * NUM_BUCKETS]
        route_count = torch.tensor(values[2 * NUM_BUCKETS :], dtype=torch.float64).view(
            self.route_count.shape
        )
        total = max(scalars[len(SUMS)], 1.0)
        out: dict[str, Any] = {k: scalars[i] / total for i, k in enumerate(SUMS)}
        for i in range(NUM_BUCKETS):
            c = bucket_count[i]
            out[f"loss_t{i}"] = bucket_loss[i] / c if c else math.nan
        if self.num_experts > 1:
            # fraction of samples routed to each expert, per block (sums to top_k over experts)
            out["route_frac"] = (route_count / total).tolist()
        out["samples"] = int(scalars[len(SUMS)])
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
    """Rank 0's sinks. Other ranks get a no-op instance.

    One record per step: a run resumed from step S logs steps S+1... again, so at the start the
    records of later steps (written before a crash) are dropped from ``metrics.jsonl`` and
    ``validation.jsonl``, and TensorBoard is told to purge its events from step S+1 on.
    """

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
        for name in ("metrics.jsonl", "validation.jsonl"):
            self._drop_after(self.run_dir / name, start_step)
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Readers hide the events of steps >= purge_step written before this point.
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    @staticmethod
    def _drop_after(path: Path, step: int) -> None:
        """Rewrite a JSON-lines file without its records of steps after ``step`` (and without a last
        line cut short by a crash), atomically; untouched when there is nothing to drop."""
        import os

        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                dropped += 1
                continue
            kept.append(line + "\n")
        if not dropped:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

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
