"""The checkpoint format in one process, without DeepSpeed: writing (synchronous and asynchronous),
the manifest and every kind of damage it reports, format versions, the model's identity, and
``switchdit verify``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchdit_dist.checkpoint import dcp_io, schema, store
from switchdit_dist.checkpoint.manifest import Damaged, Manifest
from switchdit_dist.checkpoint.schema import CheckpointMeta, FormatError, RankState, TrainerState
from switchdit_dist.config import ModelSection
from switchdit_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MODEL = dataclasses.asdict(
    ModelSection(size="tiny", input_size=16, in_channels=1, num_classes=10, num_experts=4)
)


def entries(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    state = {
        schema.model_key("w"): torch.randn(1000, generator=generator),
        schema.optim_key("w", "exp_avg"): torch.randn(1000, generator=generator),
        schema.optim_key("w", "step"): torch.tensor(float(step)),
        schema.ema_key("w"): torch.randn(10, 100, generator=generator),
    }
    state[schema.rank_key(0)] = RankState(loader={"epoch": 1}, rng={"seed": step}).encode()
    trainer = TrainerState(step, step, 16 * step, 0, 0, None)
    state[schema.TRAINER_STATE_KEY] = trainer.encode()
    return state


def meta(step: int, model: dict | None = None) -> CheckpointMeta:
    return CheckpointMeta(
        step=step, world_size=1, ep_size=1, zero_stage=2, precision="fp32", model=model or MODEL
    )


def write(
    run_dir: Path, steps, asynchronous: bool = False, keep: int = 3, hook=None
) -> store.CheckpointWriter:
    writer = store.CheckpointWriter(run_dir / "checkpoints", 0, 1, keep, None, asynchronous)
    for step in steps:
        request = store.SaveRequest(step, entries(step), {}, meta(step), hook)
        outcome = writer.save(request) if not asynchronous else (writer.save(request) or writer.wait())
        assert outcome is not None
    return writer


@pytest.fixture
def run(tmp_path) -> Path:
    write(tmp_path, [2, 4])
    return tmp_path


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / store.tag_for(step)


# --- writing ----------------------------------------------------------------------------------------


def test_a_checkpoint_is_one_dcp_directory_with_manifest_and_marker(run):
    path = ckpt(run, 4)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    names = sorted(p.name for p in path.iterdir())
    assert names == [".metadata", "COMPLETE", "__0_0.distcp", "manifest.json", "meta.json"]
    written = Manifest.read(path)
    assert written.step == 4 and sorted(written.files) == [".metadata", "__0_0.distcp", "meta.json"]
    assert all(written.files[n].size == (path / n).stat().st_size for n in written.files)
    assert json.loads((path / "meta.json").read_text())["step"] == 4
    assert store.verify(path, full=True) == []
    got = store.read_entries(path, list(entries(4)))
    for key, value in entries(4).items():
        assert torch.equal(got[key], value), key
    side = RankState.decode(got[schema.rank_key(0)], "test")
    assert side.loader == {"epoch": 1}


def test_asynchronous_save_writes_the_same_checkpoint_and_keeps_one_in_flight(tmp_path):
    writer = store.CheckpointWriter(tmp_path / "checkpoints", 0, 1, 3, None, asynchronous=True)
    state = entries(3)
    expected = {k: v.clone() for k, v in state.items()}
    assert writer.save(store.SaveRequest(3, state, {}, meta(3))) is None
    state[schema.model_key("w")].add_(1.0)  # training goes on: the staged copy is what gets written
    with pytest.raises(RuntimeError, match="still in flight"):
        writer.save(store.SaveRequest(4, entries(4), {}, meta(4)))
    outcome = writer.wait()
    assert outcome.ok and outcome.step == 3
    got = store.read_entries(ckpt(tmp_path, 3), list(expected))
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert store.verify(ckpt(tmp_path, 3), full=True) == []


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_failed_write_leaves_latest_on_the_previous_checkpoint(run, asynchronous):
    def disk_full(step):
        raise OSError(28, "No space left on device (injected)")

    writer = store.CheckpointWriter(run / "checkpoints", 0, 1, 3, None, asynchronous)
    outcome = writer.save(store.SaveRequest(6, entries(6), {}, meta(6), disk_full)) or writer.wait()
    assert not outcome.ok and "No space left" in outcome.error
    assert store.find_resume_point(run / "checkpoints") == ckpt(run, 4)
    assert not (ckpt(run, 6) / "COMPLETE").exists()


def test_keep_prunes_old_checkpoints_and_crash_leftovers(tmp_path):
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)  # a crash leftover
    write(tmp_path, [2, 3, 4, 5], keep=2)
    assert [p.name for p in store.step_dirs(tmp_path / "checkpoints")] == ["step_00000004", "step_00000005"]


# --- damage -----------------------------------------------------------------------------------------


def damaged(path: Path, full: bool) -> str:
    with pytest.raises(Damaged) as info:
        store.verify_or_raise(path, full)
    return str(info.value)


def test_a_truncated_file_is_named(run):
    data = ckpt(run, 4) / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size - 100)
    assert f"__0_0.distcp: truncated: {size - 100} bytes, {size} written" in damaged(ckpt(run, 4), full=False)


def test_a_flipped_byte_is_a_checksum_mismatch_with_full_verification(run):
    data = ckpt(run, 4) / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert store.verify(ckpt(run, 4), full=False) == []  # same size
    assert "__0_0.distcp: checksum mismatch" in damaged(ckpt(run, 4), full=True)


def test_a_deleted_file_is_named(run):
    (ckpt(run, 4) / ".metadata").unlink()
    assert ".metadata: missing" in damaged(ckpt(run, 4), full=False)


def test_a_missing_manifest_is_named(run):
    (ckpt(run, 4) / "manifest.json").unlink()
    assert "manifest.json: missing" in damaged(ckpt(run, 4), full=False)


def test_verify_command_names_the_damage_and_the_fallback(run, capsys):
    from switchdit_dist import cli

    os.truncate(ckpt(run, 4) / "__0_0.distcp", 10)
    proc = subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", "verify", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "DAMAGED  " in proc.stdout and "__0_0.distcp: truncated: 10 bytes" in proc.stdout
    assert f"ok       {ckpt(run, 2)}" in proc.stdout
    assert "checkpoint.fallback=previous starts from: step_00000002" in proc.stdout
    assert cli.main(["verify", str(ckpt(run, 2))]) == 0
    assert "ok       " in capsys.readouterr().out


# --- versions and identity --------------------------------------------------------------------------


def test_newer_and_older_formats_are_refused_with_a_message(run):
    path = ckpt(run, 4)
    data = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**data, "format_version": schema.FORMAT_VERSION + 1}))
    with pytest.raises(
        FormatError, match=r"format version 3, newer than this version of switchdit reads \(2\)"
    ):
        CheckpointMeta.read(path)
    del data["format_version"]
    (path / "meta.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"old format \(DeepSpeed's files, format 1\)"):
        CheckpointMeta.read(path)


def test_loss_settings_may_change_and_the_architecture_may_not():
    saved = meta(4)
    changes = saved.check_model({**MODEL, "prior_loss_weight": 0.5, "class_dropout_prob": 0.2}, "ckpt")
    assert changes == {"model.prior_loss_weight": (1.0, 0.5), "model.class_dropout_prob": (0.1, 0.2)}
    with pytest.raises(
        UserError, match=r"different model \(model.size: 'tiny' -> 'S', .*hidden_size: 96 -> 384"
    ):
        saved.check_model({**MODEL, "size": "S"}, "ckpt")
    # no null-class row without label dropout: a change of architecture, not of a setting
    with pytest.raises(UserError, match=r"null_class: True -> False"):
        saved.check_model({**MODEL, "class_dropout_prob": 0.0}, "ckpt")


def test_a_checkpoint_copied_between_runs_reads_back_in_another_place(run, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(ckpt(run, 2), copy)
    assert store.verify(copy, full=True) == []
    assert dcp_io.tensor_index(copy)[schema.ema_key("w")].shape == (10, 100)


def test_the_slurm_pre_check_reads_the_checkpoint_header(run):
    from switchdit_dist.config import load_config
    from switchdit_dist.launch.slurm import check_resume_layout

    tiny = REPO / "configs" / "tiny.yaml"
    # any layout resumes, and loss settings may change
    check_resume_layout(run, load_config(tiny, ["model.prior_loss_weight=0.5"]), world_size=4)
    with pytest.raises(
        UserError, match=r"step_00000004 was written for a different model \(model.top_k: 2 -> 1\)"
    ):
        check_resume_layout(run, load_config(tiny, ["model.top_k=1"]), world_size=2)


def test_the_batch_script_records_a_fallback_in_attempts_jsonl(tmp_path):
    """The batch script's ``record_attempt`` takes the trainer's fallback record into the attempt's
    line (run here alone, with the variables the script sets)."""
    from switchdit_dist.train.checkpoint import FALLBACK_RECORD

    template = (REPO / "switchdit_dist" / "launch" / "templates" / "slurm.sbatch.tmpl").read_text()
    start = template.index("record_attempt() {")
    function = template[start : template.index("\n}\n", start) + 3]
    record = {"resumed_from": "step_00000009", "damaged": ["step_00000012"]}
    (tmp_path / FALLBACK_RECORD).write_text(json.dumps(record) + "\n")
    script = f"""
ATTEMPT_DIR={tmp_path}; RUN_DIR={tmp_path}; SLURM_JOB_ID=5; RESTART_COUNT=1; SLURM_JOB_NODELIST=n1
SLURM_NTASKS=2; ATTEMPT_START=t; OUTCOME=finished; EXIT_CODE=0; SIGNALLED=""; LOST_HOST=""
{function}
record_attempt done
rm "$ATTEMPT_DIR/{FALLBACK_RECORD}"
record_attempt done
"""
    subprocess.run(["bash", "-c", script], check=True)
    lines = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [line["checkpoint_fallback"] for line in lines] == [record, None]


@pytest.mark.slow
def test_the_checkpoint_benchmark_runs_the_demo_model(tmp_path):
    import yaml

    from switchdit_dist.bench.ckpt import DEMO_MODEL

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    assert dict(item.split("=", 1) for item in DEMO_MODEL) == {
        f"model.{k}": str(v) for k, v in demo["model"].items()
    }
    cmd = [sys.executable, "-m", "switchdit_dist.cli", "bench", "ckpt", "--models", "demo"]
    out = subprocess.run(
        # one mode: the asynchronous one runs every part of the synchronous one and more
        [*cmd, "--modes", "async", "--saves", "2", "--every", "2", "--json"],
        cwd=tmp_path,  # not the checkout: the benchmark needs no configs/ folder
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout[out.stdout.index("[\n") :])  # after any log lines
    assert [(r["model"], r["mode"]) for r in rows] == [("demo", "async")]
    assert all(r["disk_bytes"] > r["raw_bytes"] * 0.9 and r["blocked_s"] > 0 for r in rows)
