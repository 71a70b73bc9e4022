from pathlib import Path

import pytest

from switchdit_dist.config import load_config, parse_overrides, validate
from switchdit_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def shards(tmp_path):
    """A real (tiny) prepared dataset, so validation of data paths passes."""
    from switchdit_dist.cli import main

    out = tmp_path / "digits"
    assert main(["prepare", "digits", "--out", str(out), "--shards", "2"]) == 0
    return out / "manifest.json"


def load(*overrides, shards=None):
    extra = [f"data.shards={shards}"] if shards else []
    return load_config(REPO / "configs" / "tiny.yaml", [*extra, *overrides])


def test_demo_and_tiny_configs_load():
    for name in ("demo.yaml", "tiny.yaml"):
        config = load_config(REPO / "configs" / name)
        assert config.model.arch == "switch-dit"
    assert load_config(REPO / "configs" / "demo.yaml").parallel.ep_size == 2


def test_overrides_are_typed_and_nested():
    config = load("train.steps=7", "optim.lr=3e-4", "logging.tensorboard=false", "optim.betas=[0.9, 0.95]")
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.logging.tensorboard is False
    assert config.optim.betas == [0.9, 0.95]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown config key 'train\.step'.*did you mean 'steps'"):
        load("train.step=5")
    with pytest.raises(UserError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        load("modle.size=S")


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(UserError, match=r"train\.steps: expected int, got str 'many'"):
        load("train.steps=many")
    with pytest.raises(UserError, match=r"optim\.lr: expected float, got bool"):
        load("optim.lr=true")


def test_override_without_equals():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load("train.steps")


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        load_config(REPO / "configs" / "nope.yaml")


def test_ep_size_must_divide_experts(shards):
    config = load("parallel.ep_size=3", shards=shards)
    with pytest.raises(UserError, match=r"parallel\.ep_size=3 does not divide model\.num_experts=4"):
        validate(config, world_size=6)


def test_ep_size_must_divide_world_size(shards):
    config = load("parallel.ep_size=4", shards=shards)
    with pytest.raises(UserError, match=r"parallel\.ep_size=4 does not divide the world size 2"):
        validate(config, world_size=2)


def test_batch_must_divide_by_data_parallel_size(shards):
    config = load("train.global_batch=15", shards=shards)
    with pytest.raises(
        UserError, match=r"train\.global_batch=15 is not divisible by the data-parallel size 2"
    ):
        validate(config, world_size=2)
    config = load("train.global_batch=20", "train.micro_batch=8", shards=shards)
    with pytest.raises(UserError, match=r"not a multiple of train\.micro_batch x data-parallel size"):
        validate(config, world_size=2)


def test_missing_data_path_is_reported(tmp_path):
    config = load(shards=tmp_path / "absent" / "manifest.json")
    with pytest.raises(UserError, match=r"data\.shards"):
        validate(config, world_size=2)


def test_valid_layout_passes(shards):
    validate(load(shards=shards), world_size=2)
    validate(load("parallel.ep_size=4", "train.micro_batch=4", shards=shards), world_size=4)


def test_cli_prints_one_line_error(tmp_path, capsys):
    from switchdit_dist.cli import main

    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--run-dir",
            str(tmp_path),
            "train.stepz=3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "did you mean 'steps'" in err and "Traceback" not in err
