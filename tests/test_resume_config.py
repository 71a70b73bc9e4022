"""What a resume may change: refused keys are named with old and new value, allowed changes are
recorded in the run's history, and convert records the settings a checkpoint was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from switchdit_dist.config import load_config, save_resolved
from switchdit_dist.errors import UserError
from switchdit_dist.export.convert import diffusion_settings
from switchdit_dist.train import resume_config

REPO = Path(__file__).resolve().parents[1]


def config(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """What resume_config looks at: a complete step directory that ``latest`` names."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text(f"{step}\n")
    (run_dir / "checkpoints" / "latest").write_text(path.name + "\n")
    return path


def start(run_dir: Path, cfg) -> resume_config.ResumePlan:
    """What rank 0 does before training: check, record; then the trainer writes config.yaml."""
    plan = resume_config.check(run_dir, cfg)
    resume_config.record(run_dir, cfg, plan)
    save_resolved(cfg, run_dir / "config.yaml")
    return plan


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / resume_config.HISTORY_NAME).read_text().splitlines()]


def test_a_fresh_start_records_its_config(tmp_path):
    plan = start(tmp_path, config())
    assert plan.step == 0 and plan.checkpoint is None
    (entry,) = history(tmp_path)
    assert entry["step"] == 0 and entry["changed"] == {} and entry["config"] == config().to_dict()


def test_changes_of_meaning_are_refused_with_key_old_and_new_value(tmp_path):
    start(tmp_path, config())
    fake_checkpoint(tmp_path, 6)
    changed = config("diffusion.noise_schedule=cosine", "diffusion.num_timesteps=500", "model.top_k=1")
    with pytest.raises(UserError) as refused:
        resume_config.check(tmp_path, changed)
    text = str(refused.value)
    assert "diffusion.noise_schedule: 'linear' -> 'cosine' (a different diffusion process)" in text
    assert "diffusion.num_timesteps: 1000 -> 500" in text
    assert "model.top_k: 2 -> 1 (a different model)" in text
    assert "another --run-dir" in text and "step_00000006" in text
    assert len(history(tmp_path)) == 1  # nothing recorded


def test_switching_classifier_free_guidance_dropout_off_is_refused(tmp_path):
    start(tmp_path, config())
    fake_checkpoint(tmp_path, 3)
    with pytest.raises(UserError, match="model.class_dropout_prob: 0.1 -> 0.0"):
        resume_config.check(tmp_path, config("model.class_dropout_prob=0"))
    assert resume_config.check(tmp_path, config("model.class_dropout_prob=0.2")).changed


def test_allowed_changes_are_recorded_and_an_unchanged_resume_adds_nothing(tmp_path):
    start(tmp_path, config())
    fake_checkpoint(tmp_path, 6)
    plan = start(tmp_path, config("optim.lr=0.0005", "train.steps=20", "model.prior_loss_weight=0.5"))
    assert plan.step == 6
    assert plan.changed == {
        "optim.lr": (0.001, 0.0005),
        "train.steps": (12, 20),
        "model.prior_loss_weight": (1.0, 0.5),
    }
    entry = history(tmp_path)[-1]
    assert entry["step"] == 6 and entry["changed"]["optim.lr"] == [0.001, 0.0005]
    start(tmp_path, config("optim.lr=0.0005", "train.steps=20", "model.prior_loss_weight=0.5"))
    assert len(history(tmp_path)) == 2


def test_a_key_the_recorded_config_lacks_counts_as_its_default(tmp_path):
    cfg = config()
    recorded = cfg.to_dict()
    del recorded["logging"]["record_keys"]  # as if written before the key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    fake_checkpoint(tmp_path, 3)
    assert resume_config.check(tmp_path, cfg).changed == {}


def test_a_run_older_than_the_history_keeps_its_recorded_config_first(tmp_path):
    save_resolved(config(), tmp_path / "config.yaml")  # written by a start before the history existed
    fake_checkpoint(tmp_path, 3)
    start(tmp_path, config("optim.lr=0.002"))
    first, second = history(tmp_path)
    assert first["step"] == 0 and first["from"] == "config.yaml" and first["config"]["optim"]["lr"] == 0.001
    assert second["step"] == 3 and second["changed"] == {"optim.lr": [0.001, 0.002]}


def test_convert_records_the_diffusion_the_checkpoint_was_trained_with(tmp_path):
    """config.yaml is rewritten at every start; the history says what trained each checkpoint."""
    start(tmp_path, config("diffusion.noise_schedule=cosine"))
    ckpt = fake_checkpoint(tmp_path, 3)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config().to_dict()))  # a later, other file
    assert diffusion_settings(ckpt) == {"num_timesteps": 1000, "noise_schedule": "cosine"}
    assert resume_config.trained_with(tmp_path, 3)["diffusion"]["noise_schedule"] == "cosine"
    # without a history (older runs) config.yaml is all there is
    (tmp_path / resume_config.HISTORY_NAME).unlink()
    assert diffusion_settings(ckpt)["noise_schedule"] == "linear"


def test_the_config_of_a_step_is_the_last_start_below_it(tmp_path):
    start(tmp_path, config())
    fake_checkpoint(tmp_path, 6)
    start(tmp_path, config("optim.lr=0.0005"))
    assert resume_config.trained_with(tmp_path, 6)["optim"]["lr"] == 0.001  # written before the resume
    assert resume_config.trained_with(tmp_path, 9)["optim"]["lr"] == 0.0005
