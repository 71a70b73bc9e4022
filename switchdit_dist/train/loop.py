"""The training loop: data -> the training step (``step.py``: diffusion loss + diffusion prior
loss) -> DeepSpeed engine -> EMA, metrics and checkpoints.

Every random draw of a step comes from generators seeded by where it happens: timesteps, noise and
label dropout by (seed, step, slot), the prior's unit permutation by (seed, step), so a resumed run
repeats the uninterrupted run bit for bit without replaying generator state; the global generator
states are saved as well for anything else that draws from them. The slot (rank x accumulation
steps + micro-step) is the micro-batch's place in the global batch: a run resumed on another number
of ranks with the same micro-batch size draws the same inputs for the same place.

A step waits for the device only where it must: once at its start, for the routes and the prior
matching (``Objective.plan``), and for the non-finite and stop decisions every rank agrees on.
Losses and routing counts are accumulated on the device and read at logging steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from switchdit_dist.checkpoint.schema import CheckpointMeta
from switchdit_dist.config import Config, save_resolved
from switchdit_dist.devices import matmul_peak_tflops
from switchdit_dist.errors import UserError
from switchdit_dist.models.flops import train_flops_per_image
from switchdit_dist.parallel_dims import ParallelDims
from switchdit_dist.sample_placement import owner_table, route_aware, slot_timesteps
from switchdit_dist.train import checkpoint as ckpt
from switchdit_dist.train import comm, resume_config
from switchdit_dist.train.distributed import DistEnv
from switchdit_dist.train.ema import EMA
from switchdit_dist.train.engine import build_engine, expert_placement
from switchdit_dist.train.faults import FaultInjector
from switchdit_dist.train.metrics import IntervalStats, MetricsWriter, gate_image, peak_memory_mb
from switchdit_dist.train.seeding import derive_seed
from switchdit_dist.train.signals import EXIT_CODES, StopRequest
from switchdit_dist.train.step import Draws, MicroPlan, Objective, draw


@dataclass
class StepRunner:
    """The micro-steps of one optimizer step: their random draws, the step's routes and prior
    matching, and forward, backward and optimizer step on the engine. Built by the trainer; tests
    build it from parts."""

    engine: Any  # a DeepSpeed engine, or anything with __call__, backward and step
    module: torch.nn.Module
    objective: Objective
    guard: Any  # the optimizer guard: says whether the last step was skipped
    faults: FaultInjector
    seed: int
    rank: int
    accum: int
    micro_batch: int
    latent_shape: tuple[int, int, int]
    num_timesteps: int
    class_dropout_prob: float
    device: torch.device
    placement: str = "random"  # parallel.placement (sample_placement.py)
    world_size: int = 1
    ep_size: int = 1
    num_local_experts: int = 1
    # This step's micro-batches, kept as tensors: read only if the step turns out to be skipped.
    nonfinite_batch: list[dict] = field(default_factory=list)

    def draws(self, step: int, micro: int) -> Draws:
        slot = self.rank * self.accum + micro
        generator = torch.Generator().manual_seed(derive_seed(self.seed, step, slot))
        return draw(
            generator, self.micro_batch, self.latent_shape, self.num_timesteps, self.class_dropout_prob
        )

    def place(self, step: int, draws: list[Draws]) -> list[Draws]:
        """Under ``route_aware`` placement this rank's micro-batches train the timesteps the
        placement deals them (their noise and label dropout stay): every rank computes the same
        deal from the replicated router, with one device read and no communication."""
        if self.placement != "route_aware":
            return draws
        num_timesteps = self.num_timesteps
        with torch.no_grad():
            table = self.module.route_table(torch.arange(num_timesteps, device=self.device)).cpu()
        owners = owner_table(table, self.num_local_experts)
        slots = self.world_size * self.accum
        drawn = slot_timesteps(self.seed, step, slots, self.micro_batch, num_timesteps)
        placed = route_aware(drawn, owners, self.ep_size, self.accum)
        mine = placed[self.rank * self.accum : (self.rank + 1) * self.accum]
        return [Draws(mine[m], d.noise, d.drop) for m, d in enumerate(draws)]

    def plan(self, step: int, draws: list[Draws]) -> list[MicroPlan] | None:
        """Routes and prior matching of the whole step, before its first forward (one device read)."""
        rng = np.random.default_rng(derive_seed(self.seed, step, 2))
        return self.objective.plan(self.module, [d.t for d in draws], rng)

    def micro_step(
        self, batch, draws: Draws, plan: MicroPlan | None, step: int, micro: int, stats: IntervalStats
    ) -> torch.Tensor:
        """One micro-batch's forward, backward and (at the accumulation boundary) optimizer step;
        returns its loss (detached)."""
        inputs = self.objective.inputs(batch.latent, batch.cls, draws, self.device)
        terms = self.objective(self.engine, inputs, plan)
        loss = terms.loss
        if self.faults.active("nan", step):
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.faults.during_step(step)
        self.guard.last_step_skipped = False
        self.engine.step()
        loss = loss.detach()
        self.nonfinite_batch.append({"micro": micro, "t": draws.t, "keys": list(batch.keys), "loss": loss})
        stats.add_micro(terms.per_sample, terms.prior, inputs.t, None if plan is None else plan.route_counts)
        return loss


class Trainer:
    """A training job's rank, built and resumed by the constructor (data, model, engine, EMA,
    checkpoints; ``start_step`` is where it continues); ``run()`` trains to ``train.steps``."""

    def __init__(self, config: Config, run_dir: Path, env: DistEnv):
        self.config = config
        self.run_dir = Path(run_dir)
        self.env = env
        self.faults = FaultInjector(env.rank)
        self.skipped_total = 0
        self.stop = StopRequest()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._build()
        self.start_step = self._resume()
        if self.start_step > 0:  # the restored optimizer holds the checkpoint's lr, betas, eps and decay
            resume_config.apply_optimizer_settings(self.engine, config)
        if env.is_main:
            save_resolved(config, self.run_dir / "config.yaml")

    # --- set-up ----------------------------------------------------------------------------

    def _build(self) -> None:
        from switchdit_dist.data.loader import LatentLoader
        from switchdit_dist.diffusion import create_diffusion

        cfg, env = self.config, self.env
        self.dims = ParallelDims.from_config(cfg, env.world_size)
        self.accum = self.dims.accumulation
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
        self.guard.piggyback = self.stop.order  # the stop agreement rides on the guard's all-reduce
        self.module = self.engine.module
        self.placement = expert_placement(self.module)
        self.ema = EMA.from_engine(self.engine, cfg.train.ema_decay)
        input_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.objective = Objective(self.diffusion, self.model_config, input_dtype)
        self.steps = StepRunner(
            engine=self.engine,
            module=self.module,
            objective=self.objective,
            guard=self.guard,
            faults=self.faults,
            seed=cfg.train.seed,
            rank=env.rank,
            accum=self.accum,
            micro_batch=cfg.train.micro_batch,
            latent_shape=expected,
            num_timesteps=cfg.diffusion.num_timesteps,
            class_dropout_prob=self.model_config.class_dropout_prob,
            device=env.device,
            placement=cfg.parallel.placement,
            world_size=env.world_size,
            ep_size=cfg.parallel.ep_size,
            num_local_experts=max(self.dims.num_local_experts, 1),
        )
        self.checkpoints = ckpt.CheckpointManager(
            self.run_dir, env.rank, env.world_size, cfg.checkpoint, comm.new_cpu_group(cfg.parallel.timeout_s)
        )
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
        """Continue from the newest intact checkpoint, written by any layout (number of processes,
        parallel.ep_size, zero_stage). With another number of ranks the data loader cannot continue
        mid-epoch (it starts the next epoch) and the global RNG states are not restored."""
        resumed = self.checkpoints.resume(self.engine, self.placement, vars(self.config.model))
        if resumed is None:
            return 0
        self.loader.load_state_dict(resumed.side.loader)
        if resumed.same_ranks:
            ckpt.set_rng_state(resumed.side.rng)
        self.skipped_total = resumed.skipped_total
        self.ema.load_state_dict(resumed.ema)
        self.checkpoints.record_resume(resumed)
        meta, cfg = resumed.meta, self.config
        layout = (self.env.world_size, cfg.parallel.ep_size, cfg.parallel.zero_stage)
        if meta.layout != layout and self.env.is_main:
            print(
                f"resharded {resumed.path}: written by {meta.world_size} process(es) with parallel.ep_size="
                f"{meta.ep_size}, zero_stage={meta.zero_stage}; resumed on {self.env.world_size} "
                f"with ep_size={cfg.parallel.ep_size}, zero_stage={cfg.parallel.zero_stage}",
                flush=True,
            )
        return resumed.step

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        cfg, env = self.config, self.env
        step = self.start_step
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
        consecutive_skips = 0
        interval_start = time.perf_counter()
        try:
            while step < cfg.train.steps:
                step += 1
                self.steps.nonfinite_batch = []
                plan_start = time.perf_counter()
                draws = [self.steps.draws(step, micro) for micro in range(self.accum)]
                draws = self.steps.place(step, draws)
                plan = self.steps.plan(step, draws)
                stats.compute += time.perf_counter() - plan_start
                for micro in range(self.accum):
                    wait_start = time.perf_counter()
                    batch = next(batches)
                    compute_start = time.perf_counter()
                    stats.data_wait += compute_start - wait_start
                    if cfg.logging.record_keys:
                        self._record_keys(step, micro, batch.keys)
                    micro_plan = None if plan is None else plan[micro]
                    self.steps.micro_step(batch, draws[micro], micro_plan, step, micro, stats)
                    stats.compute += time.perf_counter() - compute_start
                if self._step_was_skipped():
                    consecutive_skips += 1
                    self._report_nonfinite(step, writer)
                    self._check_nonfinite_limit(consecutive_skips, step)
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
                    record = self.validator.evaluate(self.module, self.objective)
                    writer.log_validation(step, record)
                signum = self.stop.agreed(self.guard.take_piggyback())
                due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                final = bool(signum) or step == cfg.train.steps
                if (due or final) and not self._save(step, writer, final):
                    # retry waits for the next interval; the last save of a run has none
                    if cfg.checkpoint.on_write_error == "stop" or final:
                        raise UserError(
                            f"checkpoint at step {step} could not be written (see the message above); "
                            f"{self.checkpoints.latest_text()}"
                        )
                if signum:
                    exit_code = EXIT_CODES[signum]
                    writer.message(f"stopping after step {step} on signal {signum}; checkpoint written")
                    break
        except UserError:
            # A save still in flight finishes (or names its failure) before the run stops; its
            # collectives run on the checkpoint group beside the loop's, so no rank waits on this one.
            self.checkpoints.finish()
            raise
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

    def _check_nonfinite_limit(self, consecutive: int, step: int) -> None:
        limit = self.config.train.max_consecutive_nonfinite
        if consecutive > limit:
            self.checkpoints.finish()  # a save in flight counts in the message below
            raise UserError(
                f"{consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"(limit train.max_consecutive_nonfinite={limit}); stopping: "
                f"{self.checkpoints.latest_text()}; see {self.run_dir}/nonfinite.jsonl"
            )

    def _report_nonfinite(self, step: int, writer: MetricsWriter) -> None:
        """Every rank records its own batch (timesteps, sample keys) of the skipped step."""
        self.skipped_total += 1
        micro_batches = [
            {**m, "t": m["t"].tolist(), "loss": float(m["loss"])} for m in self.steps.nonfinite_batch
        ]
        record = {"step": step, "rank": self.env.rank, "micro_batches": micro_batches}
        with open(self.run_dir / "nonfinite.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer.message(
            f"step {step}: non-finite loss or gradient; optimizer and EMA update skipped "
            f"({self.skipped_total} skipped so far; batches in {self.run_dir / 'nonfinite.jsonl'})"
        )

    def _save(self, step: int, writer: MetricsWriter, final: bool) -> bool:
        """Write the checkpoint of ``step``; False if it failed. An asynchronous save returns once
        the state is copied aside; a failure of the previous one is reported here. ``final``: the
        last save of the run or one on a stop, complete before this returns."""
        cfg = self.config
        meta = CheckpointMeta(
            step=step,
            world_size=self.env.world_size,
            ep_size=cfg.parallel.ep_size,
            zero_stage=cfg.parallel.zero_stage,
            precision=self.precision,
            model=vars(cfg.model),
        )
        hook = None
        if self.faults.active("crash_in_checkpoint", step):

            def hook(s):
                os.kill(os.getpid(), 9)
        elif self.faults.active("checkpoint_write_error", step):

            def hook(s):
                raise OSError(28, "No space left on device (injected)")

        report = self.checkpoints.save(
            self.engine,
            self.placement,
            step,
            self.ema.state_dict(),
            self.loader.state_dict(),
            self.skipped_total,
            meta,
            hook,
            wait=final,
        )
        if report.failed_step is not None:
            if cfg.checkpoint.on_write_error == "stop":
                raise UserError(
                    f"checkpoint at step {report.failed_step} could not be written (see the message above); "
                    f"{self.checkpoints.latest_text()}"
                )
            writer.message(f"checkpoint at step {report.failed_step} could not be written; retrying later")
        return report.ok

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
