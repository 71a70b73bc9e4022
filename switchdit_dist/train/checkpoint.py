"""Checkpoints: the DeepSpeed engine state plus this project's side state, written crash-safely.

Layout of ``RUN_DIR/checkpoints/``::

    latest                          name of the newest complete checkpoint (moved last, atomically)
    step_00000006/
        mp_rank_00_model_states.pt, layer_*_expert_*_..., *optim_states.pt   (DeepSpeed)
        side_rank_{r}.pt            per rank: step, data position, RNG states, config hash
        ema_shared.safetensors      EMA of the replicated (non-expert) weights, from rank 0
        ema_experts_ep{p}.safetensors   EMA of expert-parallel rank p's experts (global names)
        portable/                   weights + Adam state by global name, any layout (see portable.py)
        meta.json                   step, topology, model config and its hash
        COMPLETE                    written by rank 0 once every rank has finished writing

A crash at any moment leaves ``latest`` on the previous complete checkpoint: a directory without
``COMPLETE`` is never resumed from, and ``latest`` moves only after ``COMPLETE`` exists.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from switchdit_dist.errors import UserError
from switchdit_dist.train import comm, param_names

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[-1])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p.name))


def find_resume_point(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        candidate = ckpt_dir / latest.read_text().strip()
        if candidate.is_dir() and is_complete(candidate):
            return candidate
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
class ExpertPlacement:
    """Where this rank's experts sit: its expert-parallel rank and how many experts it holds."""

    ep_rank: int = 0
    num_local_experts: int = 1
    is_expert_writer: bool = True  # first rank of its expert-data-parallel group


class CheckpointManager:
    def __init__(self, run_dir: Path, rank: int, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep

    # --- writing ---------------------------------------------------------------------------

    def save(
        self,
        engine,
        step: int,
        side_state: dict[str, Any],
        ema_state: dict[str, torch.Tensor],
        placement: ExpertPlacement,
        meta: dict[str, Any],
        fault_hook=None,
    ) -> Path | None:
        """Write a checkpoint on every rank; returns its path, or None if any rank failed.

        A failed write (disk full, permissions) is reported by every rank and leaves ``latest``
        and the previous checkpoints untouched.
        """
        tag = tag_for(step)
        path = self.dir / tag
        error: Exception | None = None
        try:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                if path.exists():  # a leftover from a crash at this very step
                    shutil.rmtree(path)
            comm.barrier()
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        except OSError as err:
            error = err
        # The topology-independent copy is written with collectives: every rank joins only if
        # every rank's DeepSpeed files were written.
        if not comm.any_rank(error is not None):
            from switchdit_dist.train.portable import save_portable  # (portable imports this module)

            try:
                save_portable(engine, path, placement, step)
                if fault_hook is not None:
                    fault_hook(step)
                torch.save(side_state, path / f"side_rank_{self.rank}.pt")
                self._save_ema(path, ema_state, placement, step)
                if self.rank == 0:
                    (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            except OSError as err:
                error = err
        if comm.any_rank(error is not None):
            if error is not None:
                print(f"[rank {self.rank}] checkpoint write to {path} failed: {error}", flush=True)
            return None
        if self.rank == 0:
            atomic_write_text(path / COMPLETE, f"{step}\n")
            atomic_write_text(self.dir / LATEST, tag + "\n")
            self._prune(current=path)
        comm.barrier()
        return path

    def _save_ema(
        self, path: Path, ema_state: dict[str, torch.Tensor], placement: ExpertPlacement, step: int
    ) -> None:
        shared, experts = {}, {}
        for name, tensor in ema_state.items():
            if param_names.is_expert_name(name):
                global_name = param_names.to_global(name, placement.ep_rank, placement.num_local_experts)
                experts[global_name] = tensor.contiguous()
            else:
                shared[name] = tensor.contiguous()
        metadata = {"step": str(step)}  # lets readers (switchdit convert) catch files from another step
        if self.rank == 0:
            save_file(shared, str(path / "ema_shared.safetensors"), metadata=metadata)
        if experts and placement.is_expert_writer:
            save_file(
                experts, str(path / f"ema_experts_ep{placement.ep_rank}.safetensors"), metadata=metadata
            )

    def _prune(self, current: Path) -> None:
        complete = complete_checkpoints(self.dir)
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # Incomplete directories older than the newest complete one are crash leftovers.
        for leftover in self.dir.glob("step_*"):
            if (
                leftover.is_dir()
                and not is_complete(leftover)
                and step_of(leftover.name) < step_of(current.name)
            ):
                shutil.rmtree(leftover, ignore_errors=True)

    # --- reading ---------------------------------------------------------------------------

    def resume_point(self) -> Path | None:
        return find_resume_point(self.dir)

    def check_compatible(self, path: Path, model_hash: str, model_section: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads((path / "meta.json").read_text())
        if meta["model_hash"] != model_hash:
            saved = meta.get("model", {})
            changed = sorted(
                k for k in set(saved) | set(model_section) if saved.get(k) != model_section.get(k)
            )
            details = ", ".join(f"model.{k}: {saved.get(k)!r} -> {model_section.get(k)!r}" for k in changed)
            raise UserError(
                f"checkpoint {path} was written for a different model ({details}); "
                "use a new --run-dir, or restore the model settings to resume"
            )
        return meta

    def load_side_state(self, path: Path) -> dict[str, Any]:
        file = path / f"side_rank_{self.rank}.pt"
        if not file.is_file():
            raise UserError(
                f"checkpoint {path} has no side state for rank {self.rank} ({file.name}); "
                "it was written by a "
                "different number of processes"
            )
        return torch.load(file, map_location="cpu", weights_only=True)

    def load_ema(
        self, path: Path, placement: ExpertPlacement, local_names: list[str]
    ) -> dict[str, torch.Tensor]:
        state = load_file(str(path / "ema_shared.safetensors"))
        expert_file = path / f"ema_experts_ep{placement.ep_rank}.safetensors"
        if expert_file.is_file():
            wanted = set(local_names)
            for name, tensor in load_file(str(expert_file)).items():
                # Experts held whole on one rank keep their global names; sharded ones map to local ids.
                local = (
                    name
                    if name in wanted
                    else param_names.to_local(name, placement.ep_rank, placement.num_local_experts)
                )
                if local is not None:
                    state[local] = tensor
        missing = sorted(set(local_names) - set(state))
        if missing:
            raise UserError(f"checkpoint {path}: EMA lacks {len(missing)} weight(s), e.g. {missing[:3]}")
        return {name: state[name] for name in local_names}
