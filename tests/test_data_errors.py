"""Bad input: every case stops with a message naming the shard and key, or is skipped and counted."""

import itertools
import json
import logging

import numpy as np
import pytest
import webdataset as wds

from switchdit_dist.data.config import DataConfig, validate
from switchdit_dist.data.errors import DataError
from switchdit_dist.data.format import encode_latent, encode_sample
from switchdit_dist.data.loader import LatentLoader
from switchdit_dist.data.writers.synthetic import write_synthetic
from switchdit_dist.errors import UserError

SHAPE = (4, 8, 8)


def good(key, cls=1):
    return encode_sample(key, np.zeros(SHAPE, np.float32), cls)


def rewrite_shard(path, samples):
    """Replace a shard's content, keeping its manifest entry (same number of samples)."""
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)


def run_all(config, batches=None, batch_size=2, **kw):
    loader = LatentLoader(config, batch_size=batch_size, rank=0, world_size=1, **kw)
    n = batches or loader.steps_per_epoch
    return loader, list(itertools.islice(iter(loader), n))


@pytest.fixture
def data(tmp_path):
    write_synthetic(tmp_path, [6, 6, 6], latent_shape=SHAPE)
    return tmp_path


BAD_SAMPLES = {
    "missing latent": ({"__key__": "bad", "cls": b"1"}, "no 'latent.npy' member"),
    "wrong shape": (
        {"__key__": "bad", "latent.npy": encode_latent(np.zeros((4, 8, 9), np.float32)), "cls": b"1"},
        "has shape [4, 8, 9]; the manifest says [4, 8, 8]",
    ),
    "wrong dtype": (
        {"__key__": "bad", "latent.npy": encode_latent(np.zeros(SHAPE, np.float64)), "cls": b"1"},
        "has dtype float64; the manifest says float32",
    ),
    "nan": (
        {"__key__": "bad", "latent.npy": encode_latent(np.full(SHAPE, np.nan, np.float32)), "cls": b"1"},
        "NaN or Inf",
    ),
    "inf": (
        {
            "__key__": "bad",
            "latent.npy": encode_latent(np.full(SHAPE, np.inf, np.float16).astype(np.float32)),
            "cls": b"1",
        },
        "contains 256 NaN or Inf values",
    ),
    "class out of range": (
        {"__key__": "bad", "latent.npy": encode_latent(np.zeros(SHAPE, np.float32)), "cls": b"12"},
        "class 12 is outside [0, 10)",
    ),
    "class not a number": (
        {"__key__": "bad", "latent.npy": encode_latent(np.zeros(SHAPE, np.float32)), "cls": b"cat"},
        "expected an integer",
    ),
    "not npy": ({"__key__": "bad", "latent.npy": b"hello", "cls": b"1"}, "is not a .npy file"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_stops_with_shard_and_key(data, case):
    sample, message = BAD_SAMPLES[case]
    shard = data / "train-000001.tar"
    rewrite_shard(
        shard, [good(f"ok{i}") for i in range(3)] + [sample] + [good(f"ok{i}") for i in range(3, 5)]
    )
    with pytest.raises(DataError) as err:
        run_all(DataConfig(shards=str(data), shuffle_shards=False))
    assert str(err.value).startswith(f"{shard}: sample 'bad': ")
    assert message in str(err.value)


def test_truncated_tar_names_the_shard(data):
    shard = data / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside a member
    with pytest.raises(DataError, match=r"train-000002\.tar: truncated tar: member '.*' at byte"):
        run_all(DataConfig(shards=str(data), shuffle_shards=False))


def test_tar_cut_at_a_member_boundary_is_caught_by_the_manifest_count(data):
    shard = data / "train-000000.tar"
    rewrite_shard(shard, [good(f"ok{i}") for i in range(4)])
    with pytest.raises(DataError, match=r"train-000000\.tar: holds 4 samples but the manifest lists 6"):
        run_all(DataConfig(shards=str(data), shuffle_shards=False))


def test_not_a_tar_file(data):
    (data / "train-000001.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DataError, match=r"train-000001\.tar: corrupt tar header at byte 0"):
        run_all(DataConfig(shards=str(data), shuffle_shards=False))


@pytest.mark.slow
def test_worker_errors_reach_the_training_process(data):
    sample, message = BAD_SAMPLES["nan"]
    shard = data / "train-000001.tar"
    rewrite_shard(shard, [good(f"ok{i}") for i in range(5)] + [sample])
    config = DataConfig(shards=str(data), shuffle_shards=False, num_workers=3)
    with pytest.raises(DataError, match=rf"{shard}: sample 'bad': .*{message}"):
        run_all(config)


def test_skip_counts_bad_samples_and_keeps_going(data, caplog):
    shard = data / "train-000001.tar"
    nan, _ = BAD_SAMPLES["nan"]
    missing, _ = BAD_SAMPLES["missing latent"]
    rewrite_shard(shard, [good("ok0"), nan, good("ok1"), missing, good("ok2"), good("ok3")])
    config = DataConfig(shards=str(data), shuffle_shards=False, on_error="skip", max_errors=5)
    with caplog.at_level(logging.WARNING):
        loader, batches = run_all(config, batches=8)  # 16 readable samples in the first epoch
    keys = [k for b in batches for k in b.keys]
    assert "bad" not in keys and {"ok0", "ok1", "ok2", "ok3"} <= set(keys)
    assert loader.error_count == 2 and loader.state_dict()["errors"] == 2
    assert f"{shard}: sample 'bad'" in caplog.text


def test_skip_stops_once_max_errors_is_exceeded(data):
    nan, _ = BAD_SAMPLES["nan"]
    rewrite_shard(data / "train-000001.tar", [good("a"), nan, good("b"), nan, good("c"), good("d")])
    config = DataConfig(shards=str(data), shuffle_shards=False, on_error="skip", max_errors=1)
    with pytest.raises(
        UserError, match=r"more than data.max_errors=1 .* the last: .*train-000001\.tar: sample 'bad'"
    ):
        run_all(config)


def test_skipped_truncated_shard_is_topped_up_to_equal_steps(data, caplog):
    shard = data / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # cut inside its first sample
    config = DataConfig(shards=str(data), shuffle_shards=False, on_error="skip")
    with caplog.at_level(logging.WARNING):
        loader, batches = run_all(config, batch_size=3, batches=8)
    assert loader.steps_per_epoch == 6  # 18 listed samples, 12 readable: 6 come from a second pass
    assert "topping up" in caplog.text
    keys = [k for b in batches for k in b.keys]
    assert len(set(keys[:12])) == 12 and set(keys[12:18]) <= set(keys[:12])
    # resuming inside the top-up pass gives the same batches
    stopped, _ = run_all(config, batch_size=3, batches=5)
    resumed = LatentLoader(config, batch_size=3, rank=0, world_size=1)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    assert stopped.state_dict()["pass"] == 1
    after = [k for b in itertools.islice(iter(resumed), 3) for k in b.keys]
    assert keys[:15] + after == keys


def test_state_from_another_layout_starts_the_next_epoch(data, caplog):
    config = DataConfig(shards=str(data), shuffle_buffer=3)
    loader, _ = run_all(config, batches=2)
    other = LatentLoader(config, batch_size=3, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(loader.state_dict())
    assert "layout changed (batch_size)" in caplog.text and other.state_dict()["epoch"] == 1
    with pytest.raises(UserError, match="loader state: expected a dict from LatentLoader.state_dict"):
        other.load_state_dict({"epoch": 3})


def test_error_count_survives_resume(data):
    nan, _ = BAD_SAMPLES["nan"]
    rewrite_shard(data / "train-000000.tar", [nan, good("a"), good("b"), good("c"), good("d"), good("e")])
    config = DataConfig(shards=str(data), shuffle_shards=False, on_error="skip")
    loader, _ = run_all(config, batches=2)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = LatentLoader(config, batch_size=2, rank=0, world_size=1)
    resumed.load_state_dict(state)
    list(itertools.islice(iter(resumed), 3))
    assert resumed.error_count == 1  # counted once, not again on the replay


# --- manifest and config -----------------------------------------------------------------------


def test_manifest_not_json(data):
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json: not valid JSON"):
        LatentLoader(DataConfig(shards=str(data)), batch_size=2, rank=0, world_size=1)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("latent_shape"), "missing key 'latent_shape'"),
        (
            lambda m: m.update(latent_dtype="int8"),
            "key 'latent_dtype': expected one of ['float16', 'float32']",
        ),
        (lambda m: m.update(num_classes=0), "key 'num_classes': expected a positive integer"),
        (lambda m: m["shards"].append({"name": "x.tar"}), "key 'shards[3]': expected an object"),
    ],
)
def test_manifest_bad_key_is_named(data, edit, message):
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        LatentLoader(
            DataConfig(shards=str(data / "train-{000000..000002}.tar")), batch_size=2, rank=0, world_size=1
        )
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_manifest_and_missing_shards(tmp_path, data):
    (data / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"data.shards: no manifest for shard .* prepare manifest"):
        validate(DataConfig(shards=str(data / "train-{000000..000002}.tar")))
    with pytest.raises(
        UserError, match=r"data.shards: 2 of 5 shard files do not exist, e.g. .*train-000003\.tar"
    ):
        validate(DataConfig(shards=str(data / "train-{000000..000004}.tar")))
    with pytest.raises(UserError, match=r"data.shards: .*manifest.json: cannot read the manifest"):
        validate(DataConfig(shards=str(tmp_path / "elsewhere" / "manifest.json")))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"shards": ""}, "data.shards: no shards given"),
        ({"shards": 5}, "data.shards: expected a string or a list of strings"),
        ({"on_error": "ignore"}, "data.on_error: expected one of ['raise', 'skip'], got 'ignore'"),
        ({"num_workers": -1}, "data.num_workers: expected an integer >= 0, got -1"),
        ({"shuffle_buffer": 1.5}, "data.shuffle_buffer: expected an integer >= 0"),
        ({"prefetch": 0}, "data.prefetch: expected an integer >= 1"),
    ],
)
def test_config_errors_name_the_key(data, change, message):
    config = DataConfig(shards=str(data))
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UserError) as err:
        validate(config)
    assert message in str(err.value)


def test_pipe_shards_need_an_explicit_manifest(data):
    spec = f"pipe:cat {data}/train-{{000000..000002}}.tar"
    with pytest.raises(UserError, match="set data.manifest"):
        validate(DataConfig(shards=spec))
    config = DataConfig(shards=spec, manifest=str(data / "manifest.json"), shuffle_shards=False)
    _, batches = run_all(config)
    assert batches[0].keys == ["s00000000", "s00000001"]


def test_too_little_data_for_one_step(data):
    with pytest.raises(UserError, match=r"data.shards: 18 samples in 3 shards .* batch_size=10 .* 2 ranks"):
        LatentLoader(DataConfig(shards=str(data)), batch_size=10, rank=0, world_size=2)
