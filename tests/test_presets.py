from pathlib import Path

import pytest
import torch

from switchdit_dist.config import load_config, validate
from switchdit_dist.models.registry import build_model

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "imagenet256").glob("*.yaml"))


def dit_params(depth, d, patch=2, channels=4, classes=1000, tokens=256):
    """All parameters of DiT, the fixed position embedding included, counted by hand."""
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    out = patch * patch * 2 * channels
    return (
        channels * patch * patch * d
        + d  # patch embedding
        + tokens * d  # position embedding
        + (256 * d + d)
        + (d * d + d)  # timestep MLP
        + (classes + 1) * d  # labels + null class
        + depth * block
        + (2 * d * d + 2 * d)
        + (d * out + out)  # final layer
    )


def switch_extra(depth, d, experts=3):
    return depth * (experts * (d * d + d) + d * experts + experts)


SIZES = {"s": (12, 384), "b": (12, 768), "l": (24, 1024), "xl": (28, 1152)}
EXPECTED = {f"dit-{k}-2": dit_params(*v) for k, v in SIZES.items()}
EXPECTED.update({f"switch-dit-{k}-2": dit_params(*v) + switch_extra(*v) for k, v in SIZES.items()})


def test_hand_count_matches_the_public_reference_counts():
    assert EXPECTED["dit-s-2"] == 32_963_360
    assert EXPECTED["dit-b-2"] == 130_512_416
    assert EXPECTED["dit-xl-2"] == 675_129_632
    assert EXPECTED["switch-dit-s-2"] == 38_299_460


def test_all_eight_presets_exist():
    assert sorted(p.stem for p in PRESETS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_for_one_node_of_8_gpus_and_builds(path):
    config = load_config(path)
    validate(config, world_size=8, check_data=False)
    assert config.train.global_batch == 256 and config.optim.lr == 1e-4 and config.train.ema_decay == 0.9999
    assert (
        config.train.steps == 400_000
        and config.model.learn_sigma
        and config.diffusion.noise_schedule == "linear"
    )
    with torch.device("meta"):
        model = build_model(config.model.build_config())
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[path.stem]
