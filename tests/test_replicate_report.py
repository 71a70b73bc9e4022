"""The replication's comparison on a made-up output folder, checked against hand-computed values:
paired differences, sampling noise, equal-time interpolation, steps to a level, buckets, markdown."""

import json

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.eval.replication.analysis import analyse
from switchdit_dist.eval.replication.collect import collect
from switchdit_dist.eval.replication.layout import Layout
from switchdit_dist.eval.replication.markdown import BEGIN, END, render, splice
from switchdit_dist.eval.replication.stats import AHEAD, BEHIND, WITHIN_NOISE

FD = {  # (model, seed) -> step -> Fréchet distance at sampling seed 0
    ("dit", 0): {100: 100.0, 200: 60.0},
    ("switch-dit", 0): {100: 110.0, 200: 48.0},
    ("dit", 1): {100: 90.0, 200: 50.0},
    ("switch-dit", 1): {100: 95.0, 200: 45.0},
}
VAL = {  # validation loss at steps 50, 100, 150, 200
    ("dit", 0): [0.5, 0.4, 0.35, 0.3],
    ("switch-dit", 0): [0.55, 0.42, 0.33, 0.27],
    ("dit", 1): [0.52, 0.41, 0.36, 0.31],
    ("switch-dit", 1): [0.5, 0.4, 0.32, 0.28],
}
STEP_TIME = {"dit": [0.1, 0.5, 0.1], "switch-dit": [0.125, 0.125, 0.9]}  # medians 0.1, 0.125


def write_eval(layout, model, seed, step, k, fd, acc=0.5):
    record = {"frechet_distance": fd, "accuracy": acc, "num_samples": 1000, "sampling_seconds": 20.0}
    record["scoring_seconds"] = 1.0
    layout.eval_file(model, seed, step, k).write_text(json.dumps(record))


def make_folder(out):
    layout = Layout(out)
    for (model, seed), fds in FD.items():
        run = layout.run_dir(model, seed)
        run.mkdir(parents=True)
        for step, fd in fds.items():
            write_eval(layout, model, seed, step, 0, fd)
        lines = []
        for step, loss in zip((50, 100, 150, 200), VAL[(model, seed)]):
            # bucket 0 of Switch-DiT 10% above DiT's, every other bucket 10% below
            factor = [1.1] + [0.9] * 9 if model == "switch-dit" else [1.0] * 10
            ref = VAL[("dit", seed)][(50, 100, 150, 200).index(step)]
            buckets = {f"val_loss_t{i}": ref * f for i, f in enumerate(factor)}
            lines.append(json.dumps({"step": step, "val_loss": loss, **buckets}))
        # a resumed run logs step 50 twice: the last line wins
        lines.insert(0, json.dumps({"step": 50, "val_loss": 9.0}))
        (run / "validation.jsonl").write_text("\n".join(lines) + "\n")
        metrics = [
            json.dumps({"step": 10 * (i + 1), "step_time_s": t}) for i, t in enumerate(STEP_TIME[model])
        ]
        (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
        layout.train_marker(model, seed).write_text(json.dumps({"seconds": 30.0 if model == "dit" else 40.0}))
    write_eval(layout, "dit", 0, 200, 1, 62.0)
    write_eval(layout, "switch-dit", 0, 200, 1, 47.0)
    invocation = {
        "command": "tools/replicate_small.sh --seeds 0,1",
        "code_version": "abc1234",
        "start_utc": "2026-01-02T03:04:05+00:00",
        "end_utc": "2026-01-02T03:50:05+00:00",
        "wall_seconds": 2760.0,
        "status": "finished",
    }
    layout.invocations.write_text(json.dumps(invocation) + "\n")
    return layout


@pytest.fixture
def analysis(tmp_path):
    make_folder(tmp_path)
    c = collect(tmp_path)
    return c, analyse(c)


def test_equal_steps_paired_over_seeds_and_sampling_noise(analysis):
    c, a = analysis
    assert (a.seeds, a.eval_steps) == ([0, 1], [100, 200])
    assert a.step_time == {"dit": {0: 0.1, 1: 0.1}, "switch-dit": {0: 0.125, 1: 0.125}}
    assert a.step_time_ratio.mean == pytest.approx(1.25)
    noise = a.sampling_noise
    assert (noise.seed, noise.step, noise.sampling_seeds) == (0, 200, [0, 1])
    assert noise.per_model["dit"]["frechet_distance"].std == pytest.approx(2**0.5)  # 60, 62
    assert noise.diff["frechet_distance"].std == pytest.approx(4.5**0.5)  # -12, -15
    (s100, c100), (s200, c200) = a.equal_steps["frechet_distance"]
    # step 200: diffs -12, -5: mean -8.5, std 4.95, sem 3.5; 2 x sem = 7 and 2 x noise 4.24 < 8.5
    assert s200 == 200 and c200.diff.mean == -8.5 and c200.wins == 2 and c200.verdict == AHEAD
    assert c200.ratio.mean == pytest.approx(0.85) and c200.ratio.std == pytest.approx(0.0707, abs=1e-4)
    assert c100.wins == 0 and c100.verdict == BEHIND  # +10, +5: mean 7.5, sem 2.5
    val200 = dict(a.equal_steps["val_loss"])[200]
    assert val200.diff.mean == pytest.approx(-0.03) and val200.verdict == AHEAD
    assert a.eval_seconds.mean == 21.0 and a.eval_samples == 1000
    assert a.train_seconds["switch-dit"].mean == 40.0
    assert [s.mean for _, s in a.val_curve["dit"]][0] == pytest.approx(0.51)  # 0.5, 0.52; not 9.0


def test_equal_time_reads_switch_dit_at_the_step_it_reached_in_dit_time(analysis):
    _, a = analysis
    first, second = a.equal_time["frechet_distance"]
    # DiT step 100 = 10 s = Switch-DiT step 80: before its first evaluation
    assert first.dit_step == 100 and first.comparison is None
    # DiT step 200 = 20 s = Switch-DiT step 160: 110 + 0.6 (48 - 110) = 72.8 and 95 + 0.6 (45 - 95) = 65
    assert second.seconds.mean == pytest.approx(20.0) and second.switch_step.mean == pytest.approx(160.0)
    assert second.comparison.switch.mean == pytest.approx((72.8 + 65.0) / 2)
    assert second.comparison.verdict == BEHIND
    val = a.equal_time["val_loss"][1].comparison
    # 0.33 + 0.2 (0.27 - 0.33) = 0.318 vs 0.30; 0.32 + 0.2 (0.28 - 0.32) = 0.312 vs 0.31
    assert val.diff.mean == pytest.approx(0.01) and val.verdict == WITHIN_NOISE


def test_steps_to_reach_a_level(analysis):
    _, a = analysis
    rows = {(r.metric, r.definition): r for r in a.thresholds}
    late = rows[("val_loss", "DiT's mean at step 200")]
    assert late.level == pytest.approx(0.305)
    # DiT seed 0: 150 + 50 (0.305 - 0.35) / (0.30 - 0.35) = 195; seed 1 stays above 0.305
    assert late.steps["dit"][0] == pytest.approx(195.0) and late.steps["dit"][1] is None
    assert late.steps["switch-dit"] == pytest.approx([150 + 50 * 0.025 / 0.06, 168.75])
    assert late.seconds["switch-dit"][1] == pytest.approx(168.75 * 0.125)
    assert late.comparison is None  # not every run reached it
    early = rows[("val_loss", "DiT's mean at step 100")]
    assert early.level == pytest.approx(0.405)
    assert early.steps["dit"] == pytest.approx([97.5, 105.0])
    assert early.steps["switch-dit"] == pytest.approx([100 + 50 * 0.015 / 0.09, 97.5])
    assert early.comparison.verdict == WITHIN_NOISE
    fd = rows[("frechet_distance", "DiT's mean at step 200")]
    # DiT seed 0 ends at 60 > 55; seed 1: 100 + 100 (55 - 90) / (50 - 90) = 187.5
    assert fd.level == 55.0 and fd.steps["dit"][0] is None and fd.steps["dit"][1] == pytest.approx(187.5)


def test_validation_loss_per_timestep_bucket(analysis):
    _, a = analysis
    row = a.buckets[200]
    assert row[0].ratio.mean == pytest.approx(1.1) and row[0].wins == 0
    assert row[5].ratio.mean == pytest.approx(0.9) and row[5].wins == 2


def test_markdown_states_provenance_verdict_and_tables_and_splices(analysis, tmp_path):
    c, a = analysis
    text = render(c, a, "fig.png", None, None)
    assert "tools/replicate_small.sh --seeds 0,1" in text and "`abc1234`" in text
    assert "2026-01-02T03:04:05+00:00" in text and "46 min 0 s" in text
    assert "Fréchet distance: behind at step 100; ahead at step 200" in text
    assert "better in 2 of 2 seeds, Switch-DiT / DiT 0.85 ± 0.07" in text
    assert (
        "| 200 | 55.00 ± 7.07 | 46.50 ± 2.12 | -8.50 ± 4.95 | -12.00, -5.00 | 0.85 ± 0.07 | 2 of 2 | ahead |"
        in text
    )
    assert "![DiT vs Switch-DiT" in text and "One evaluation took 21.0 ± 0.0 s" in text
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nmethods\n\n{BEGIN}\nold\n{END}\n\n## Notes\n")
    splice(doc, "new section\n")
    splice(doc, "newer section\n")
    after = doc.read_text()
    assert after.startswith("# Results\n\nmethods\n\n") and after.endswith(f"{END}\n\n## Notes\n")
    assert "newer section" in after and "new section" not in after and "old" not in after


def test_a_seed_missing_evaluations_is_left_out_and_no_seed_is_an_error(tmp_path):
    layout = make_folder(tmp_path)
    layout.eval_file("switch-dit", 1, 200, 0).unlink()
    assert collect(tmp_path).seeds == [0]
    with pytest.raises(UserError, match="no training seed"):
        collect(tmp_path / "nothing")
