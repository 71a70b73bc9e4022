"""The training loop: data -> diffusion loss (+ diffusion prior loss) -> DeepSpeed engine -> EMA,
metrics and checkpoints.

Every random draw of a step (timesteps, noise, label dropout, the prior's unit permutation) comes
from generators seeded by (seed, step, slot), so a resumed run repeats the uninterrupted run bit for
bit without replaying generator state; the global generator states are saved as well for anything
else that draws from them. The slot (rank x accumulation steps + micro-step) is the micro-batch's
place in the global batch: a run resumed on another number of ranks with the same micro-batch size
draws the same timesteps and noise for the same place.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from switchdit_dist.config import Config, grad_accumulation, save_resolved
from switchdit_dist.devices import matmul_peak_tflops
from switchdit_dist.errors import UserError
from switchdit_dist.models.flops import train_flops_per_image
from switchdit_dist.models.prior import DiffusionPriorLoss
from switchdit_dist.train import checkpoint as ckpt
from switchdit_dist.train import portable
from switchdit_dist.train.distributed import DistEnv
from switchdit_dist.train.ema import EMA
from switchdit_dist.train.engine import build_engine, expert_placement
from switchdit_dist.train.faults import FaultInjector
from switchdit_dist.train.metrics import IntervalStats, MetricsWriter, gate_image, peak_memory_mb
from switchdit_dist.train.seeding import derive_seed
from switchdit_dist.train.signals import EXIT_CODES, StopRequest


class Trainer:
    def __init__(self, config: Config, run_dir: Path, env: DistEnv):
        self.config = config
        self.run_dir = Path(run_dir)
        self.env = env
        self.faults = FaultInjector(env.rank)
        self.skipped_total = 0
        self.nonfinite_batch: list[dict] = []
        self.stop = StopRequest()

    # --- set-up ----------------------------------------------------------------------------

    def _setup(self) -> None:
        from switchdit_dist.data.loader import LatentLoader
        from switchdit_dist.diffusion import create_diffusion

        cfg, env = self.config, self.env
        self.accum = grad_accumulation(cfg, env.world_size)
        self.model_config = cfg.model.build_config()
        self.diffusion = create_diffusion(
            timestep_respacing="",
            noise_schedule=cfg.diffusion.noise_schedule,
            learn_sigma=cfg.model.learn_sigma,
            num_timesteps=cfg.diffusion.num_timesteps,
        )
        self.loader = LatentLoader(
            cfg.data, batch_size=cfg.train.micro_batch, rank=env.rank, world_size=env.world_size
        )
        expected = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        if tuple(self.loader.latent_shape) != expected:
            raise UserError(
                f"data.shards hold latents of shape {tuple(self.loader.latent_shape)} but the model expects "
                f"{expected} (model.in_channels, model.input_size)"
            )
        if self.loader.num_classes > cfg.model.num_classes:
            raise UserError(
                f"data has {self.loader.num_classes} classes but model.num_classes={cfg.model.num_classes}"
            )
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.engine, self.precision, self.guard = build_engine(cfg, self.model_config, env)
        self.module = self.engine.module
        self.placement = expert_placement(self.module)
        self.ema = EMA(self.module, cfg.train.ema_decay)
        self.prior = (
            DiffusionPriorLoss(
                self.model_config.depth, cfg.model.num_experts, cfg.model.top_k, cfg.diffusion.num_timesteps
            )
            if cfg.model.is_moe and cfg.model.prior_loss_weight > 0
            else None
        )
        self.checkpoints = ckpt.CheckpointManager(self.run_dir, env.rank, cfg.checkpoint.keep)
        self.flops_per_image = train_flops_per_image(self.model_config)
        self.peak_flops = None  # matmul FLOP/s of this GPU in the training dtype: the MFU denominator
        if env.device.type == "cuda":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.peak_flops = matmul_peak_tflops(env.device, dtype, 8192) * 1e12
        self.validator = None
        if cfg.data.validation_shards and cfg.logging.val_every:
            from switchdit_dist.train.validation import Validator

            self.validator = Validator(
                cfg.data,
                batch_size=cfg.train.micro_batch,
                rank=env.rank,
                world_size=env.world_size,
                max_batches=cfg.logging.val_batches,
                num_timesteps=cfg.diffusion.num_timesteps,
                seed=cfg.train.seed,
            )

    def _resume(self) -> int:
        path = self.checkpoints.resume_point()
        if path is None:
            return 0
        meta = self.checkpoints.check_compatible(path, self.config.model_hash(), vars(self.config.model))
        layout = (self.env.world_size, self.config.parallel.ep_size, self.config.parallel.zero_stage)
        if (meta["world_size"], meta["ep_size"], meta.get("zero_stage")) != layout:
            # DeepSpeed reads its MoE/ZeRO files only in the layout that wrote them
            return self._resume_resharded(path, meta)
        load_path, _ = self.engine.load_checkpoint(
            str(self.checkpoints.dir),
            tag=path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {path}")
        side = self.checkpoints.load_side_state(path)
        self.loader.load_state_dict(side["loader"])
        ckpt.set_rng_state(side["rng"])
        self.skipped_total = int(side.get("skipped_total", 0))
        names = [n for n, _ in self.module.named_parameters()]
        self.ema.load_state_dict(self.checkpoints.load_ema(path, self.placement, names))
        return int(side["step"])

    def _resume_resharded(self, path: Path, meta: dict[str, Any]) -> int:
        """A checkpoint of another layout (number of processes, parallel.ep_size or zero_stage):
        weights, Adam state and EMA come from its portable copy (``portable.py``). With another number
        of ranks the data loader cannot continue mid-epoch: it starts the next epoch."""
        names = [n for n, _ in self.module.named_parameters()]
        same_ranks = meta["world_size"] == self.env.world_size
        resumed = portable.resume_resharded(
            self.engine, path, self.placement, names, self.env.rank, same_ranks
        )
        self.loader.load_state_dict(resumed.side["loader"])
        if same_ranks:
            ckpt.set_rng_state(resumed.side["rng"])
        self.skipped_total = int(resumed.side.get("skipped_total", 0))
        self.ema.load_state_dict(resumed.ema)
        if self.env.is_main:
            print(
                f"resharded {path}: written by {meta['world_size']} process(es) with parallel.ep_size="
                f"{meta['ep_size']}, zero_stage={meta.get('zero_stage')}; resumed on {self.env.world_size} "
                f"with ep_size={self.config.parallel.ep_size}, zero_stage={self.config.parallel.zero_stage}",
                flush=True,
            )
        return resumed.step

    # --- one step --------------------------------------------------------------------------

    def _micro_step(self, batch, step: int, micro: int, stats: IntervalStats) -> None:
        cfg, env = self.config, self.env
        device = env.device
        x0 = batch.latent.to(device, torch.float32)
        y = batch.cls.to(device)
        slot = env.rank * self.accum + micro
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, step, slot))
        t = torch.randint(0, cfg.diffusion.num_timesteps, (x0.shape[0],), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        torch.manual_seed(derive_seed(cfg.train.seed, step, slot, 1))  # label dropout
        x_t = self.diffusion.q_sample(x0, t, noise)
        model_in = x_t.to(torch.bfloat16) if self.precision == "bf16" else x_t
        routes = None
        if self.config.model.is_moe:
            out, gates = self.engine(model_in, t, y, return_gates=True)
            routes = gates.topk(cfg.model.top_k, dim=-1).indices
        else:
            out, gates = self.engine(model_in, t, y), None
        per_sample = self.diffusion.losses(out.float(), x0, x_t, t, noise)
        loss = per_sample["loss"].mean()
        prior_value = 0.0
        if self.prior is not None:
            all_t = torch.arange(cfg.diffusion.num_timesteps, device=device)
            prior_loss = self.prior(
                gates,
                t,
                self.module.gate_probs_for_timesteps(all_t),
                np.random.default_rng(derive_seed(cfg.train.seed, step, slot, 2)),
            )
            loss = loss + cfg.model.prior_loss_weight * prior_loss
            prior_value = float(prior_loss.detach())
        if self.faults.active("nan", step):
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.faults.during_step(step)
        self.guard.last_step_skipped = False
        self.engine.step()
        self.nonfinite_batch.append(
            {"micro": micro, "t": t.tolist(), "keys": list(batch.keys), "loss": float(loss.detach())}
        )
        stats.add_micro(per_sample, prior_value, t, routes)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        cfg, env = self.config, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._setup()
        step = self._resume()
        if env.is_main:
            save_resolved(cfg, self.run_dir / "config.yaml")
        writer = MetricsWriter(
            self.run_dir, env.is_main, cfg.logging.tensorboard, cfg.logging.progress, cfg.train.steps, step
        )
        if step > 0:
            writer.message(f"resumed from step {step} ({self.checkpoints.dir / ckpt.tag_for(step)})")
        stats = IntervalStats(
            cfg.diffusion.num_timesteps,
            self.model_config.depth,
            cfg.model.num_experts if cfg.model.is_moe else 1,
        )
        batches = iter(self.loader)
        self.stop.install()
        exit_code = 0
        last_saved = step
        consecutive_skips = 0
        interval_start = time.perf_counter()
        try:
            while step < cfg.train.steps:
                step += 1
                self.nonfinite_batch = []
                for micro in range(self.accum):
                    wait_start = time.perf_counter()
                    batch = next(batches)
                    compute_start = time.perf_counter()
                    stats.data_wait += compute_start - wait_start
                    if cfg.logging.record_keys:
                        self._record_keys(step, micro, batch.keys)
                    self._micro_step(batch, step, micro, stats)
                    stats.compute += time.perf_counter() - compute_start
                if self._step_was_skipped():
                    consecutive_skips += 1
                    self._report_nonfinite(step, writer)
                    self._check_nonfinite_limit(consecutive_skips, step, last_saved)
                else:
                    consecutive_skips = 0
                    self.ema.update(self.module)
                stats.steps += 1
                writer.advance()
                if step % cfg.logging.every == 0 or step == cfg.train.steps:
                    self._log(writer, stats, step, time.perf_counter() - interval_start)
                    stats.reset()
                    interval_start = time.perf_counter()
                if (
                    cfg.logging.gate_image_every
                    and cfg.model.is_moe
                    and step % cfg.logging.gate_image_every == 0
                ):
                    self._gate_image(writer, step)
                if self.validator is not None and step % cfg.logging.val_every == 0:
                    dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
                    record = self.validator.evaluate(self.module, self.diffusion, env.device, dtype)
                    writer.log_validation(step, record)
                signum = self.stop.agreed()
                due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                if due or signum or step == cfg.train.steps:
                    if self._save(step, writer):
                        last_saved = step
                    elif cfg.checkpoint.on_write_error == "stop":
                        raise UserError(
                            f"checkpoint at step {step} could not be written (see the messages above); "
                            f"latest complete checkpoint is still step {last_saved}"
                        )
                if signum:
                    exit_code = EXIT_CODES[signum]
                    writer.message(f"stopping after step {step} on signal {signum}; checkpoint written")
                    break
        finally:
            self.stop.uninstall()
            writer.close()
        if exit_code == 0 and env.is_main:
            print(f"training finished at step {step}; run directory {self.run_dir}", flush=True)
        return exit_code

    def _record_keys(self, step: int, micro: int, keys: list[str]) -> None:
        """An audit trail of the data order (a resumed run appends the replayed steps again)."""
        folder = self.run_dir / "keys"
        folder.mkdir(exist_ok=True)
        with open(folder / f"rank{self.env.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "keys": list(keys)}) + "\n")

    def _step_was_skipped(self) -> bool:
        # DeepSpeed skips by itself under some ZeRO stages/precisions (engine.was_step_applied);
        # the optimizer guard covers the others. Both decisions are the same on every rank.
        return self.guard.last_step_skipped or not self.engine.was_step_applied()

    def _check_nonfinite_limit(self, consecutive: int, step: int, last_saved: int) -> None:
        limit = self.config.train.max_consecutive_nonfinite
        if consecutive > limit:
            good = self.checkpoints.dir / ckpt.tag_for(last_saved)
            raise UserError(
                f"{consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"(limit train.max_consecutive_nonfinite={limit}); stopping. The last good checkpoint is "
                f"step {last_saved} ({good}); see {self.run_dir}/nonfinite.jsonl"
            )

    def _report_nonfinite(self, step: int, writer: MetricsWriter) -> None:
        """Every rank records its own batch (timesteps, sample keys) of the skipped step."""
        self.skipped_total += 1
        record = {"step": step, "rank": self.env.rank, "micro_batches": self.nonfinite_batch}
        with open(self.run_dir / "nonfinite.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer.message(
            f"step {step}: non-finite loss or gradient; optimizer and EMA update skipped "
            f"({self.skipped_total} skipped so far; batches in {self.run_dir / 'nonfinite.jsonl'})"
        )

    def _save(self, step: int, writer: MetricsWriter) -> bool:
        cfg = self.config
        side = {
            "step": step,
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "config_hash": cfg.model_hash(),
            "skipped_total": self.skipped_total,
            "rank": self.env.rank,
            "world_size": self.env.world_size,
        }
        meta = {
            "step": step,
            "world_size": self.env.world_size,
            "ep_size": cfg.parallel.ep_size,
            "zero_stage": cfg.parallel.zero_stage,
            "model": vars(cfg.model),
            "model_hash": cfg.model_hash(),
        }
        hook = None
        if self.faults.active("crash_in_checkpoint", step):

            def hook(s):
                os.kill(os.getpid(), 9)
        elif self.faults.active("checkpoint_write_error", step):

            def hook(s):
                raise OSError(28, "No space left on device (injected)")

        path = self.checkpoints.save(
            self.engine, step, side, self.ema.state_dict(), self.placement, meta, hook
        )
        return path is not None

    def _log(self, writer: MetricsWriter, stats: IntervalStats, step: int, elapsed: float) -> None:
        record: dict[str, Any] = stats.reduce()
        samples = record.pop("samples")
        record["grad_norm"] = _float_or_nan(self.engine.get_global_grad_norm())
        record["lr"] = float(self.engine.get_lr()[0])
        record["skipped_steps"] = self.skipped_total
        record["img_per_s"] = samples / max(elapsed, 1e-9)
        record["tokens_per_s"] = record["img_per_s"] * self.model_config.num_patches
        record["step_time_s"] = elapsed / max(stats.steps, 1)
        record["data_wait_s"] = stats.data_wait / max(stats.steps, 1)
        record["compute_s"] = stats.compute / max(stats.steps, 1)
        record["peak_mem_mb"] = peak_memory_mb(self.env.device)
        if self.peak_flops:
            achieved = record["img_per_s"] * self.flops_per_image / self.env.world_size
            record["mfu"] = achieved / self.peak_flops
        writer.log(step, record)

    def _gate_image(self, writer: MetricsWriter, step: int) -> None:
        if not writer.enabled:
            return
        probs = (
            self.module.gate_probs_for_timesteps(
                torch.arange(self.config.diffusion.num_timesteps, device=self.env.device)
            )
            .float()
            .cpu()
        )
        writer.image("routing/gate_probs", gate_image(probs), step)


def _float_or_nan(value) -> float:
    if value is None:
        return math.nan
    return float(value.item() if torch.is_tensor(value) else value)
