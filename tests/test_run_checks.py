"""Checks before any rank starts and one record per step: overrides anywhere on the command line,
value ranges in one line each, `prepare npy --num-classes` against the class folders, and the
metrics writer's view of a resumed run (metrics.jsonl and TensorBoard without replayed steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from switchdit_dist.cli import main as cli_main
from switchdit_dist.cli import parse_args
from switchdit_dist.config import load_config, validate
from switchdit_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_accepted_before_between_and_after_the_options():
    args = parse_args(["train", "a.b=1", "--config", "C", "c=2", "--run-dir", "D", "d.e=[1, 2]"])
    assert (args.config, args.run_dir) == ("C", "D")
    assert args.overrides == ["a.b=1", "c=2", "d.e=[1, 2]"]
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", "C", "--run-dir", "D", "--no-such-option"])
    with pytest.raises(SystemExit):  # a subcommand without overrides takes none
        parse_args(["convert", "RUN", "OUT", "a=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr: expected a number > 0, got -1.0"),
        ("optim.lr=.nan", "optim.lr: expected a number > 0, got nan"),
        ("optim.betas=[0.9,1.5]", "optim.betas[1]: expected a number in [0, 1), got 1.5"),
        ("optim.betas=[0.9]", "optim.betas: expected two numbers [beta1, beta2], got [0.9]"),
        ("optim.eps=0", "optim.eps: expected a number > 0, got 0.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: expected a number >= 0, got -0.1"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: expected a number >= 0, got -1"),
        ("optim.grad_clip=-1", "optim.grad_clip: expected a number >= 0, got -1.0"),
        ("model.class_dropout_prob=1", "model.class_dropout_prob: expected a number in [0, 1), got 1.0"),
        ("diffusion.num_timesteps=0", "diffusion.num_timesteps: expected a number >= 1, got 0"),
        ("checkpoint.every=-3", "checkpoint.every: expected a number >= 0, got -3"),
    ],
)
def test_values_out_of_range_fail_in_one_line_naming_the_key(override, message):
    config = load_config(REPO / "configs" / "tiny.yaml", [override])
    with pytest.raises(UserError) as err:
        validate(config, world_size=2, check_data=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("rank, printed", [(0, 1), (1, 0)])
def test_a_config_error_before_the_group_is_printed_by_rank_0_only(tmp_path, rank, printed):
    """Ranks started without `switchdit launch` (srun): all read the same config, rank 0 reports."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    argv = [
        "train",
        "optim.lr=-1",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--run-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    expected = ["switchdit train: error: optim.lr: expected a number > 0, got -1.0"] * printed
    assert proc.stderr.splitlines() == expected and proc.stdout == ""


def test_the_tiny_and_demo_configs_are_in_range():
    for name in ("tiny.yaml", "demo.yaml"):
        validate(load_config(REPO / "configs" / name), world_size=2, check_data=False)


def test_npy_num_classes_must_match_the_class_folders(tmp_path, capsys):
    for rel in ("cat/a.npy", "dog/b.npy"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "src" / rel, np.zeros((1, 2, 2), np.float32))
    argv = ["prepare", "npy", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert "--num-classes 10:" in err and "has 2 class folders" in err and "--labels" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert cli_main([*argv, "--num-classes", "2"]) == 0  # the same number is fine
    from switchdit_dist.data.format import read_manifest

    manifest = read_manifest(str(tmp_path / "out" / "manifest.json"))  # and it reads back
    assert manifest.num_classes == 2 and manifest.class_names == ["cat", "dog"]


def write_run(writer, steps) -> None:
    for step in steps:
        writer.log(step, {"loss": float(step)})
        if step % 2 == 0:
            writer.log_validation(step, {"loss": float(step)})


def test_a_resumed_run_logs_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from switchdit_dist.train.metrics import MetricsWriter

    first = MetricsWriter(tmp_path, True, True, False, total_steps=10, start_step=0)
    write_run(first, range(1, 9))  # steps 1..8, then a crash; the checkpoint is step 5
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line cut short by the crash
    resumed = MetricsWriter(tmp_path, True, True, False, total_steps=10, start_step=5)
    write_run(resumed, range(6, 11))
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    val = [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert val == [2, 4, 6, 8, 10]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6, 8, 10]


def test_a_writer_of_another_rank_touches_nothing(tmp_path):
    from switchdit_dist.train.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')
    MetricsWriter(tmp_path, False, True, False, total_steps=10, start_step=3).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 7}\n'
