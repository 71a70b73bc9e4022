"""The small-scale replication's report: reads the eval files of both runs, tables and plots them."""

import json

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.eval.replicate import collect, format_table, main, report


def write_run(out, model, scores, val=None):
    run = out / model
    run.mkdir(parents=True)
    for step, (fd, acc) in scores.items():
        record = {"steps": 25, "seed": 0, "num_samples": 200, "accuracy": acc, "frechet_distance": fd}
        (run / f"eval_step_{step:08d}.json").write_text(json.dumps(record))
    if val:
        lines = [json.dumps({"step": s, "val_loss": v, "val_loss_t0": None}) for s, v in val.items()]
        (run / "validation.jsonl").write_text("\n".join(lines) + "\n")


def test_report_tables_both_models_and_writes_plot_and_numbers(tmp_path, capsys):
    write_run(tmp_path, "dit", {200: (80.0, 0.5), 100: (120.0, 0.3)}, {100: 0.2, 150: 0.15, 200: 0.1})
    write_run(tmp_path, "switch-dit", {100: (90.0, 0.4), 200: (60.0, 0.7)})
    points, table = report(tmp_path)
    assert [(p.model, p.step) for p in points] == [
        ("dit", 100),
        ("dit", 200),
        ("switch-dit", 100),
        ("switch-dit", 200),
    ]
    assert points[0].val_loss == 0.2 and points[2].val_loss is None
    rows = [line.split() for line in table.splitlines()[1:3]]
    assert rows[0][:4] == ["100", "120.00", "90.00", "0.75"]
    assert rows[1][:6] == ["200", "80.00", "60.00", "0.75", "0.500", "0.700"]
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[3] == {
        "model": "switch-dit",
        "step": 200,
        "frechet_distance": 60.0,
        "accuracy": 0.7,
        "val_loss": None,
    }
    assert main(["--out", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_models_evaluated_at_different_steps_are_refused(tmp_path):
    write_run(tmp_path, "dit", {100: (1.0, 0.1)})
    write_run(tmp_path, "switch-dit", {200: (1.0, 0.1)})
    with pytest.raises(UserError, match="different steps"):
        collect(tmp_path)


def test_missing_or_broken_files_are_named(tmp_path, capsys):
    write_run(tmp_path, "dit", {100: (1.0, 0.1)})
    assert main(["--out", str(tmp_path)]) == 2
    assert "switch-dit" in capsys.readouterr().err
    write_run(tmp_path, "switch-dit", {100: (1.0, 0.1)})
    (tmp_path / "switch-dit" / "eval_step_00000100.json").write_text("{not json")
    with pytest.raises(UserError, match="eval_step_00000100.json"):
        collect(tmp_path)


def test_table_marks_missing_validation_losses():
    from switchdit_dist.eval.replicate import EvalPoint

    table = format_table([EvalPoint("dit", 5, 10.0, 0.5, None), EvalPoint("switch-dit", 5, 5.0, 0.6, 0.3)])
    assert table.splitlines()[1].split() == ["5", "10.00", "5.00", "0.50", "0.500", "0.600", "-", "0.3000"]


@pytest.mark.parametrize(
    "args, message",
    [(["--steps", "7"], "--steps must be a positive multiple of 3"), (["--bogus"], "unknown argument")],
)
def test_script_rejects_bad_arguments_before_doing_anything(tmp_path, args, message):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "replicate_small.sh"
    done = subprocess.run(
        ["bash", str(script), "--out", str(tmp_path / "out"), *args], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()
