"""The replication's plumbing: which work a run does, what a rerun skips, and the script itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.eval.replication.layout import Layout
from switchdit_dist.eval.replication.runner import Replication, RunSettings
from switchdit_dist.eval.replication.scoring import EvalSettings

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "replicate_small.sh"


class FakeWork:
    """Stands in for the trainer, the converter and the scorer; records what was asked of them."""

    def __init__(self, interrupt_launch: int | None = None):
        self.launches: list[str] = []
        self.evals: list[tuple[str, int]] = []
        self.interrupt_launch = interrupt_launch

    def call(self, args: list[str]) -> None:
        if args[0] == "prepare":
            out = Path(args[args.index("--out") + 1])
            (out / "val").mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
            (out / "val" / "manifest.json").write_text("{}")
            return
        run = Path(args[args.index("--run-dir") + 1])
        values = dict(a.split("=", 1) for a in args if "=" in a)
        steps, every = int(values["train.steps"]), int(values["checkpoint.every"])
        self.launches.append(f"{run.name} seed {values['train.seed']}")
        for step in range(every, steps + 1, every):
            (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True, exist_ok=True)
            if len(self.launches) == self.interrupt_launch:
                raise KeyboardInterrupt  # after the first checkpoint
        (run / "metrics.jsonl").write_text(json.dumps({"step": steps, "step_time_s": 0.1}) + "\n")

    def convert(self, options) -> None:
        Path(options.out).write_text("model")

    def score(self, model_file: Path, sampling_seed: int) -> dict:
        self.evals.append((str(Path(model_file).relative_to(self.out)), sampling_seed))
        return {"frechet_distance": 1.0, "accuracy": 0.5, "num_samples": 20}


def replicate(tmp_path, monkeypatch, work: FakeWork, seeds=(0, 1)) -> Replication:
    import switchdit_dist.export.convert as convert_module

    settings = RunSettings(
        out=tmp_path / "out",
        seeds=seeds,
        steps=4,
        eval_every=2,
        spread_seeds=1,
        eval=EvalSettings(samples=20),
    )
    work.out = settings.out
    monkeypatch.setattr(convert_module, "convert", work.convert)
    replication = Replication(settings, "replicate --test")
    monkeypatch.setattr(replication, "_call", work.call)
    replication._scorer = work
    with replication.invocation():
        replication.run()
    return replication


def test_a_rerun_resumes_an_interrupted_replication_and_then_skips_everything(tmp_path, monkeypatch, capsys):
    interrupted = FakeWork(interrupt_launch=2)  # stopped while training Switch-DiT, seed 0
    with pytest.raises(KeyboardInterrupt):
        replicate(tmp_path, monkeypatch, interrupted)
    assert interrupted.launches == ["dit seed 0", "switch-dit seed 0"] and not interrupted.evals
    layout = Layout(tmp_path / "out")
    assert layout.train_marker("dit", 0).is_file() and not layout.train_marker("switch-dit", 0).exists()

    resumed = FakeWork()
    replicate(tmp_path, monkeypatch, resumed)
    assert resumed.launches == ["switch-dit seed 0", "dit seed 1", "switch-dit seed 1"]
    expected = [
        (f"seed_{s}/{m}/ema_step_{t:08d}.safetensors", 0)
        for s in (0, 1)
        for m in ("dit", "switch-dit")
        for t in (2, 4)
    ]
    # the first seed's last checkpoint pair, scored with one more sampling seed, right after it
    spread = [(f"seed_0/{m}/ema_step_00000004.safetensors", 1) for m in ("dit", "switch-dit")]
    assert resumed.evals == expected[:4] + spread + expected[4:]
    assert "skip training dit seed 0: done" in capsys.readouterr().out

    again = FakeWork()
    replicate(tmp_path, monkeypatch, again)
    assert again.launches == [] and again.evals == []
    out = capsys.readouterr().out
    assert out.count("skip training") == 4 and out.count("skip evaluating") == 10
    statuses = [json.loads(line)["status"] for line in layout.invocations.read_text().splitlines()]
    assert statuses == ["interrupted", "finished", "finished"]
    record = json.loads(layout.eval_file("switch-dit", 1, 4, 0).read_text())
    assert (record["model"], record["seed"], record["step"]) == ("switch-dit", 1, 4)
    phases = [line.split("\t")[0] for line in layout.wall_seconds.read_text().splitlines()]
    assert phases.count("train_switch-dit_seed0") == 1  # the interrupted attempt logs no time


def test_a_rerun_with_other_settings_in_the_same_folder_is_refused(tmp_path, monkeypatch):
    replicate(tmp_path, monkeypatch, FakeWork(), seeds=(0,))
    more_seeds = RunSettings(
        out=tmp_path / "out", seeds=(0, 1, 2), steps=4, eval_every=2, eval=EvalSettings(samples=20)
    )
    Replication(more_seeds, "x").check_settings()  # other seeds: fine
    other = RunSettings(out=tmp_path / "out", steps=4, eval_every=2, eval=EvalSettings(samples=30))
    with pytest.raises(UserError, match="samples: 20 -> 30"):
        Replication(other, "x").check_settings()


def test_training_overrides_are_the_papers_switch_dit_and_keep_every_evaluated_checkpoint(tmp_path):
    settings = RunSettings(out=tmp_path, steps=1800, eval_every=600)
    replication = Replication(settings, "x", repo=tmp_path)
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "val" / "manifest.json").write_text("{}")
    switch = replication.overrides("switch-dit", 2, data)
    for key in ("model.num_experts=3", "model.top_k=2", "model.prior_loss_weight=1.0", "parallel.ep_size=1"):
        assert key in switch
    dit = replication.overrides("dit", 2, data)
    for key in (
        "train.seed=2",
        "data.seed=2",
        "checkpoint.every=600",
        "checkpoint.keep=3",
        "logging.val_every=100",
    ):
        assert key in dit and key in switch
    assert "model.arch=dit" in dit
    assert replication.version.startswith("unknown")  # tmp_path is no git checkout
    assert RunSettings(out=tmp_path, steps=1000, eval_every=500).val_every == 50  # divides 500


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds=(0, 0)), "--seeds"),
        (dict(steps=7, eval_every=2), "multiple of --eval-every"),
        (dict(spread_seeds=-1), "--spread-seeds"),
    ],
)
def test_bad_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        RunSettings(out=tmp_path, **kwargs)
    with pytest.raises(UserError, match="multiple of 10"):
        EvalSettings(samples=25)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "7"], "--steps must be a positive multiple of --eval-every"),
        (["--seeds", "0,x"], "comma-separated integers"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_script_rejects_bad_arguments_before_doing_anything(tmp_path, args, message):
    done = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "out"), *args], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_script_trains_evaluates_reports_and_resumes_a_partial_replication(tmp_path):
    """A real replication of 4 steps (one seed), then a rerun after its Switch-DiT run lost its
    last checkpoint and marker: DiT is not trained again, Switch-DiT resumes from step 2, and only
    the missing evaluations are made."""
    out, docs = tmp_path / "out", tmp_path / "results.md"
    docs.write_text("# Results\n\nhand-written methods\n")
    args = ["--seeds", "0", "--out", str(out), "--steps", "4", "--eval-every", "2", "--samples", "20"]
    args += ["--sampling-steps", "2", "--spread-seeds", "1", "--eval-threads", "1", "--docs", str(docs)]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}

    def run() -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    first = run()
    layout = Layout(out)
    assert first.count("[replicate") >= 9 and "skip" not in first
    for model in ("dit", "switch-dit"):
        for step, k in ((2, 0), (4, 0), (4, 1)):
            assert json.loads(layout.eval_file(model, 0, step, k).read_text())["num_samples"] == 20
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "gates.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "results_seeds.png").is_file() and (tmp_path / "results_seeds_gates.png").is_file()
    text = docs.read_text()
    assert (
        text.startswith("# Results\n\nhand-written methods\n")
        and "## Results over training seeds" in text
        and "Training seeds 0;" in text
    )
    assert "tools/replicate_small.sh --seeds 0" in text

    dit_metrics = (layout.run_dir("dit", 0) / "metrics.jsonl").read_text()
    switch = layout.run_dir("switch-dit", 0)
    layout.train_marker("switch-dit", 0).unlink()
    import shutil

    shutil.rmtree(layout.checkpoint("switch-dit", 0, 4))
    (switch / "checkpoints" / "latest").write_text("step_00000002")
    layout.ema_model("switch-dit", 0, 4).unlink()
    for k in (0, 1):
        layout.eval_file("switch-dit", 0, 4, k).unlink()

    second = run()
    assert "skip training dit seed 0: done" in second and "training switch-dit seed 0" in second
    assert "resumed from step 2" in second
    assert (layout.run_dir("dit", 0) / "metrics.jsonl").read_text() == dit_metrics  # not trained again
    made = [line for line in second.splitlines() if "] evaluating" in line]
    assert made == [line for line in made if "switch-dit seed 0 step 4" in line] and len(made) == 2
    assert second.count("skip evaluating") == 4
    assert len(layout.invocations.read_text().splitlines()) == 2
    assert docs.read_text().count("## Results over training seeds") == 1  # replaced, not appended
