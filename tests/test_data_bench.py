"""`switchdit bench data` runs end to end and reports consistent figures (speed is not asserted)."""

import json

from switchdit_dist.cli import main as cli_main


def test_bench_data_reports_rates_and_ratios(capsys):
    args = [
        "bench",
        "data",
        "--json",
        "--workers",
        "0,1",
        "--seconds",
        "0.3",
        "--samples",
        "400",
        "--shards",
        "4",
        "--global-batch",
        "64",
        "--step-time",
        "0.5",
        "--ranks",
        "2",
    ]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latent_shape"] == [4, 32, 32] and report["need_samples_per_s_rank"] == 64.0
    assert [r["workers"] for r in report["results"]] == [0, 1]
    for r in report["results"]:
        assert r["samples_per_s"] > 0
        assert abs(r["ratio_to_rank_need"] - r["samples_per_s"] / 64.0) < 0.01
        assert abs(r["mb_per_s"] - r["samples_per_s"] * report["bytes_per_sample"] / 1e6) < 0.01
