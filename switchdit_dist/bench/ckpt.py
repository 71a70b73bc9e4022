"""``switchdit bench ckpt``: what a checkpoint costs, on disk and in training time.

The real trainer runs on ``--nproc`` local CPU processes (gloo) on generated data, saving every
``--every`` steps; each save's *blocking time* (how long the training loop waits in ``Trainer._save``)
is measured on every rank and the slowest rank counts. With ``checkpoint.async=true`` the loop
waits only for the state to be copied aside; the write itself finishes in the background, and its
time to completion is reported next to it. Bytes on disk are those of the last checkpoint
directory, against the raw state: fp32 weights, two Adam moments and the EMA (16 bytes per
parameter) plus the per-rank side state (data position, RNG) as the checkpoint stores it.

Models: ``demo`` (the tiny Switch-DiT of ``configs/demo.yaml``, ``DEMO_MODEL``, on 16x16x1
digits-sized data) and
``S`` (Switch-DiT-S/2 on 32x32x4 latents with 1000 classes, with 4 experts instead of the
paper's 3 so that EP 2 divides them).
Both run EP 2, ZeRO-2 on 2 processes by default. Medians leave out the first save (imports and
first-time set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from switchdit_dist.errors import UserError

# The demo's Switch-DiT (configs/demo.yaml's model section), spelled out so that the benchmark
# also runs from an installed wheel, which ships no configs/ folder.
DEMO_MODEL = [
    "model.arch=switch-dit",
    "model.size=tiny",
    "model.patch_size=2",
    "model.input_size=16",
    "model.in_channels=1",
    "model.num_classes=10",
    "model.num_experts=4",
    "model.top_k=2",
    "model.expert_kind=linear",
    "model.prior_loss_weight=1.0",
]
MODELS = {
    # name: (model overrides, latent shape, classes, global batch, micro batch)
    "demo": (["model.size=tiny", "model.num_experts=4"], (1, 16, 16), 10, 16, 8),
    "S": (
        ["model.size=S", "model.num_experts=4", "model.input_size=32", "model.in_channels=4"],
        (4, 32, 32),
        1000,
        4,
        2,
    ),
}
MODES = ("sync", "async")


@dataclass
class CkptBenchConfig:
    models: list[str] = field(default_factory=lambda: ["demo", "S"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    saves: int = 5
    every: int = 3  # steps between saves: more than one, so an asynchronous write can finish
    nproc: int = 2
    ep_size: int = 2
    zero_stage: int = 2

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS] + [m for m in self.modes if m not in MODES]
        if bad or not self.models or not self.modes:
            raise UserError(f"--models from {sorted(MODELS)}, --modes from {list(MODES)}; got {bad}")
        if self.saves < 2:
            raise UserError("--saves: expected at least 2 (the first one is left out of the medians)")


@dataclass
class CkptBenchRow:
    model: str
    mode: str
    params: int
    raw_bytes: int  # weights + Adam + EMA (fp32) + side state
    disk_bytes: int
    blocked_s: float  # median time the training loop waited per save (slowest rank)
    written_s: float | None  # median time until the checkpoint was complete (async)
    saves: int

    @property
    def disk_ratio(self) -> float:
        return self.disk_bytes / self.raw_bytes


def _config_overrides(model: str, mode: str, cfg: CkptBenchConfig, data: Path) -> list[str]:
    overrides, _, _, global_batch, micro = MODELS[model]
    return [
        *overrides,
        f"data.shards={data / 'manifest.json'}",
        "data.shuffle_buffer=0",
        f"parallel.ep_size={cfg.ep_size}",
        f"parallel.zero_stage={cfg.zero_stage}",
        f"train.steps={cfg.saves * cfg.every}",
        f"train.global_batch={global_batch}",
        f"train.micro_batch={micro}",
        f"checkpoint.every={cfg.every}",
        f"checkpoint.keep={cfg.saves + 1}",
        "logging.every=1000",
        "logging.gate_image_every=0",
        "logging.tensorboard=false",
        "logging.progress=false",
        *(["checkpoint.async=true"] if mode == "async" else []),
    ]


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: str) -> None:
    from switchdit_dist.train import distributed

    distributed.export_local_rank(rank, world, port)
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch

    from switchdit_dist.config import load_config, validate
    from switchdit_dist.train.loop import Trainer

    torch.set_num_threads(1)
    config = load_config(None, [*DEMO_MODEL, *overrides])
    validate(config, world)
    env = distributed.setup(config.parallel.backend, config.parallel.timeout_s)
    trainer = Trainer(config, Path(run_dir), env)
    blocked: list[float] = []
    save = trainer._save

    def timed_save(*args):
        start = time.perf_counter()
        ok = save(*args)
        blocked.append(time.perf_counter() - start)
        return ok

    trainer._save = timed_save
    trainer.run()
    manager = trainer.checkpoints
    written = [t.written_s for t in getattr(manager, "timings", [])]
    Path(out).write_text(json.dumps({"blocked": blocked, "written": written}))
    distributed.teardown()


def _params(model: str) -> int:
    import torch

    from switchdit_dist.config import load_config
    from switchdit_dist.models.registry import build_model

    overrides, (channels, side, _), classes, _, _ = MODELS[model]
    config = load_config(
        None,
        [
            *DEMO_MODEL,
            *overrides,
            f"model.num_classes={classes}",
            f"model.in_channels={channels}",
            f"model.input_size={side}",
        ],
    )
    with torch.device("meta"):
        module = build_model(config.model.build_config())
    return sum(p.numel() for p in module.parameters())


def _side_bytes(ckpt: Path) -> int:
    """The side state as stored: ``trainer/*`` entries of the checkpoint, or old side files."""
    files = list(ckpt.glob("side_rank_*.pt"))
    if files:
        return sum(f.stat().st_size for f in files)
    from switchdit_dist.checkpoint.dcp_io import tensor_index

    return sum(
        spec.numel * spec.element_size
        for key, spec in tensor_index(ckpt).items()
        if key.startswith("trainer/")
    )


def bench_one(model: str, mode: str, cfg: CkptBenchConfig, work: Path) -> CkptBenchRow:
    import torch.multiprocessing as mp

    from switchdit_dist.data.writers.synthetic import write_synthetic
    from switchdit_dist.train.distributed import free_port

    _, shape, classes, global_batch, _ = MODELS[model]
    data = work / f"data_{model}"
    if not (data / "manifest.json").is_file():
        per_shard = max(global_batch * (cfg.saves * cfg.every + 2) // cfg.nproc, 8)
        write_synthetic(data, [per_shard] * (2 * cfg.nproc), latent_shape=shape, num_classes=classes)
    run_dir = work / f"run_{model}_{mode}"
    overrides = [
        *_config_overrides(model, mode, cfg, data),
        f"model.num_classes={classes}",
        f"model.in_channels={shape[0]}",
        f"model.input_size={shape[1]}",
    ]
    outs = [str(work / f"{model}_{mode}_rank{r}.json") for r in range(cfg.nproc)]
    context = mp.start_processes(
        _spawned, args=(cfg.nproc, free_port(), overrides, str(run_dir), outs), nprocs=cfg.nproc, join=False,
        start_method="spawn",
    )  # fmt: skip
    while not context.join():
        pass
    results = [json.loads(Path(o).read_text()) for o in outs]
    blocked = [max(r["blocked"][i] for r in results) for i in range(len(results[0]["blocked"]))]
    written = [max(r["written"][i] for r in results) for i in range(len(results[0]["written"]))]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    disk = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
    params = _params(model)
    return CkptBenchRow(
        model=model,
        mode=mode,
        params=params,
        raw_bytes=16 * params + _side_bytes(latest),
        disk_bytes=disk,
        blocked_s=statistics.median(blocked[1:]),
        written_s=statistics.median(written[1:]) if len(written) > 1 else None,
        saves=len(blocked),
    )


def _spawned(index: int, world: int, port: int, overrides: list[str], run_dir: str, outs: list[str]) -> None:
    _worker(index, world, port, overrides, run_dir, outs[index])


def format_table(rows: list[CkptBenchRow]) -> str:
    lines = [
        f"{'model':<6}{'mode':<7}{'params':>12}{'raw MB':>9}{'disk MB':>9}{'disk/raw':>9}"
        f"{'blocked s':>11}{'written s':>11}{'async/sync':>11}"
    ]
    sync = {r.model: r.blocked_s for r in rows if r.mode == "sync"}
    for r in rows:
        ratio = f"{r.blocked_s / sync[r.model]:.3f}" if r.mode == "async" and r.model in sync else "-"
        written = f"{r.written_s:.3f}" if r.written_s is not None else "-"
        lines.append(
            f"{r.model:<6}{r.mode:<7}{r.params:>12,}{r.raw_bytes / 1e6:>9.2f}{r.disk_bytes / 1e6:>9.2f}"
            f"{r.disk_ratio:>9.3f}{r.blocked_s:>11.3f}{written:>11}{ratio:>11}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="demo,S", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--modes", default="sync,async", help="comma-separated: sync, async")
    parser.add_argument("--saves", type=int, default=5, help="saves per run (default 5)")
    parser.add_argument("--every", type=int, default=3, help="steps between saves (default 3)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def run(args: argparse.Namespace) -> int:
    cfg = CkptBenchConfig(
        models=[m for m in args.models.split(",") if m],
        modes=[m for m in args.modes.split(",") if m],
        saves=args.saves,
        every=args.every,
        nproc=args.nproc,
        ep_size=args.ep_size,
        zero_stage=args.zero_stage,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="switchdit-bench-ckpt-") as tmp:
        for model in cfg.models:
            for mode in cfg.modes:
                rows.append(bench_one(model, mode, cfg, Path(tmp)))
    if args.json:
        print(json.dumps([{**asdict(r), "disk_ratio": r.disk_ratio} for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0
