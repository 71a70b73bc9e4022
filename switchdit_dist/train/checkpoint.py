"""The trainer's checkpoints: saving every rank's state (``engine_state``) through the checkpoint
store, and resuming from the newest intact checkpoint of any layout.

What a checkpoint holds and how it is written is defined in ``switchdit_dist.checkpoint``; this
module decides *when* and *which*: it builds the entries of a save, keeps at most one asynchronous
save in flight, and at resume verifies the candidate (sizes always, checksums with
``checkpoint.verify=full``), falls back to the previous intact checkpoint when
``checkpoint.fallback=previous``, checks the model, and loads the state into the engine.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from switchdit_dist.checkpoint import dcp_io, store
from switchdit_dist.checkpoint.manifest import Damage, Damaged
from switchdit_dist.checkpoint.schema import CheckpointMeta, FormatError, RankState, rank_key
from switchdit_dist.checkpoint.store import (  # noqa: F401  (the trainer's names for them)
    atomic_write_text,
    complete_checkpoints,
    find_resume_point,
    is_complete,
    step_of,
    tag_for,
)
from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, engine_state
from switchdit_dist.train.param_names import ExpertPlacement  # noqa: F401  (engine.py imports it here)

# Where a SLURM attempt's checkpoint fallback is recorded for attempts.jsonl (see the batch script).
FALLBACK_RECORD = "checkpoint-fallback.json"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_safe(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_safe(state: tuple) -> tuple:
    # A tensor instead of an ndarray, so the side state loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    """What a resume found and loaded (the weights, optimizer state and counters are in the engine)."""

    path: Path
    meta: CheckpointMeta
    step: int
    side: RankState  # this rank's own (same number of ranks) or rank 0's
    same_ranks: bool
    skipped_total: int
    ema: dict[str, torch.Tensor]  # by local name
    damaged: list[tuple[Path, list[Damage]]] = field(default_factory=list)  # newer ones passed over
    setting_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class SaveReport:
    ok: bool  # this save was written (synchronous) or handed to the background (asynchronous)
    failed_step: int | None = None  # an earlier asynchronous save that failed
    error: str = ""


class CheckpointManager:
    def __init__(self, run_dir: Path, rank: int, world_size: int, section, group=None):
        """``section``: the config's checkpoint section. ``group``: a CPU process group of all
        ranks for the checkpoint's collectives (``comm.new_cpu_group``); asynchronous saves need
        it, as they run beside the training loop's collectives."""
        self.dir = Path(run_dir) / "checkpoints"
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.section = section
        self.writer = store.CheckpointWriter(
            self.dir, rank, world_size, section.keep, group, asynchronous=section.async_
        )
        self.last_complete: int | None = None

    @property
    def timings(self) -> list[store.SaveOutcome]:
        return self.writer.outcomes

    # --- saving ---------------------------------------------------------------------------

    def save(
        self,
        engine,
        placement: ExpertPlacement,
        step: int,
        ema_state: dict[str, torch.Tensor],
        loader_state: dict[str, Any],
        skipped_total: int,
        meta: CheckpointMeta,
        fault_hook=None,
        wait: bool = False,
    ) -> SaveReport:
        """Write the checkpoint of ``step`` on every rank (collective). ``wait``: return only once
        it is complete, also when saving asynchronously (the last save of a run, a stop)."""
        earlier = self._settle(self.writer.wait())
        if earlier is not None and self.section.on_write_error == "stop":
            # The run stops on the earlier failure: starting this save would leave it in flight
            # (a partial directory) when the process exits. Every rank has the same outcome.
            return SaveReport(ok=False, failed_step=earlier.step, error=earlier.error)
        entries = engine_state.engine_entries(engine, placement)
        state = {**entries.state, **engine_state.ema_entries(ema_state, placement)}
        state[rank_key(self.rank)] = RankState(loader=loader_state, rng=rng_state()).encode()
        if self.rank == 0:
            state["trainer/state"] = engine_state.trainer_state(engine, step, skipped_total).encode()
        request = store.SaveRequest(step, state, entries.ranges, meta, fault_hook)
        outcome = self.writer.save(request)
        if outcome is None and wait:
            outcome = self.writer.wait()
        report = SaveReport(ok=True) if outcome is None else SaveReport(ok=self._settle(outcome) is None)
        if earlier is not None:
            report.failed_step, report.error = earlier.step, earlier.error
        return report

    def finish(self) -> SaveReport:
        """Wait for the save in flight; its failure, if any, as a report."""
        failed = self._settle(self.writer.wait())
        return SaveReport(ok=failed is None, failed_step=failed.step if failed else None)

    def _settle(self, outcome: store.SaveOutcome | None) -> store.SaveOutcome | None:
        """Note a finished save; returns it if it failed (after printing this rank's error)."""
        if outcome is None:
            return None
        if outcome.ok:
            self.last_complete = outcome.step
            return None
        if outcome.error and self.rank == 0:  # the same message on every rank: print it once
            print(f"checkpoint write failed: {outcome.error}", flush=True)
        return outcome

    def latest_text(self) -> str:
        """Where a resume would start, for a message after a failed save."""
        if self.last_complete is None:
            return "there is no complete checkpoint yet"
        step = self.last_complete
        return f"the latest complete checkpoint is still step {step} ({self.dir / tag_for(step)})"

    # --- resuming -------------------------------------------------------------------------

    def resume(self, engine, placement: ExpertPlacement, model_section: dict[str, Any]) -> Resumed | None:
        """Load the newest intact checkpoint into ``engine`` (collective); None for a fresh run."""
        candidates = store.resume_candidates(self.dir)
        damaged: list[tuple[Path, list[Damage]]] = []
        for path in candidates:
            meta, damages = self._inspect(path)
            if not damages:
                changes = meta.check_model(model_section, f"checkpoint {path}")
                try:
                    loaded = self._load(engine, placement, path, meta)
                except Damaged as err:
                    damages = err.damages
                else:
                    self.last_complete = loaded.step
                    loaded.damaged, loaded.setting_changes = damaged, changes
                    return loaded
            damaged.append((path, damages))
            if self.section.fallback != "previous":
                hint = (
                    "checkpoint.fallback=previous resumes from the newest intact one"
                    if len(candidates) > 1
                    else ""
                )
                raise Damaged(path, damages, hint)
        if damaged:
            listing = "; ".join(f"{p.name}: " + ", ".join(map(str, d)) for p, d in damaged)
            raise UserError(
                f"no intact checkpoint to resume from in {self.dir} ({listing}). The run does not start "
                "over by itself: repair or move the checkpoints away to start from step 0"
            )
        return None

    def _inspect(self, path: Path) -> tuple[CheckpointMeta | None, list[Damage]]:
        """The checkpoint's header and every rank's findings (the same on every rank)."""
        meta, damages = None, []
        try:
            meta = CheckpointMeta.read(path)
        except FormatError:
            raise
        except UserError as err:
            damages = [Damage("meta.json", str(err))]
        if not damages:
            try:
                damages = store.verify(path, self.section.verify == "full", self.rank, self.world_size)
            except Damaged as err:
                damages = err.damages
        found = comm.all_gather_objects([(d.file, d.problem) for d in damages], self.writer.group)
        merged = sorted({item for part in found for item in part})
        return meta, [Damage(f, p) for f, p in merged]

    def _load(self, engine, placement: ExpertPlacement, path: Path, meta: CheckpointMeta) -> Resumed:
        same_ranks = meta.world_size == self.world_size
        side_rank = self.rank if same_ranks else 0
        where = f"checkpoint {path}"
        index = dcp_io.tensor_index(path)
        targets = engine_state.load_targets(engine, placement, index, side_rank, where)
        try:
            dcp_io.load(targets.state, targets.ranges, path, self.writer.group)
        except dcp_io.ERRORS as err:  # a data file DCP cannot read: every rank raises (collective)
            raise Damaged(
                path, [Damage("(data files)", f"unreadable: {store.describe_error(err)}")]
            ) from None
        trainer = engine_state.install(engine, placement, targets.state, where)
        if trainer.step != meta.step:
            raise UserError(f"{where}: trainer state is from step {trainer.step}, meta.json says {meta.step}")
        side = RankState.decode(targets.state[rank_key(side_rank)], where)
        ema = engine_state.ema_state(targets.state, engine.module, placement)
        return Resumed(path, meta, meta.step, side, same_ranks, trainer.skipped_total, ema)

    # --- reporting a resume -----------------------------------------------------------------

    def record_resume(self, resumed: Resumed) -> None:
        """Say loudly what the resume passed over or changed: the log, metrics.jsonl and, under
        SLURM, the attempt's record (rank 0)."""
        if self.rank != 0:
            return
        events = []
        for path, damages in resumed.damaged:
            problems = ", ".join(map(str, damages))
            print(
                f"WARNING: checkpoint {path} is damaged ({problems}); resuming from the previous intact "
                f"checkpoint {resumed.path.name} instead (checkpoint.fallback=previous)",
                flush=True,
            )
            events.append(
                {
                    "event": "checkpoint_fallback",
                    "damaged": path.name,
                    "problems": [str(d) for d in damages],
                    "resumed_from": resumed.path.name,
                }
            )
        if resumed.setting_changes:
            text = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in resumed.setting_changes.items())
            print(f"training settings changed on resume from {resumed.path.name}: {text}", flush=True)
            events.append(
                {
                    "event": "training_settings_changed",
                    "changes": {k: list(v) for k, v in resumed.setting_changes.items()},
                }
            )
        if events:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                for event in events:
                    f.write(json.dumps({"step": resumed.step, **event}) + "\n")
        fallback = [e for e in events if e["event"] == "checkpoint_fallback"]
        attempt_dir = os.environ.get("SWITCHDIT_ATTEMPT_DIR")
        if fallback and attempt_dir and Path(attempt_dir).is_dir():
            record = {"resumed_from": resumed.path.name, "damaged": [e["damaged"] for e in fallback]}
            atomic_write_text(Path(attempt_dir) / FALLBACK_RECORD, json.dumps(record) + "\n")
