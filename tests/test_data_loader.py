"""LatentLoader: disjoint, equal-step epochs across ranks and workers; exact mid-epoch resume."""

import itertools
import json

import numpy as np
import pytest

from switchdit_dist.data.config import DataConfig
from switchdit_dist.data.loader import LatentLoader
from switchdit_dist.data.plan import min_rank_samples, reader_task
from switchdit_dist.data.writers.synthetic import synthetic_key, write_synthetic

UNEVEN = [13, 7, 22, 5, 17, 9, 11, 3, 15]


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def check_batch_content(batch):
    # synthetic latents carry their sample number in the first element; classes are number % 10
    numbers = [int(k[1:]) for k in batch.keys]
    assert batch.latent[:, 0, 0, 0].tolist() == [float(n) for n in numbers]
    assert batch.cls.tolist() == [n % 10 for n in numbers]


def epoch_keys(config, world, batch, epochs):
    """Per rank, per epoch: the keys in the order they were yielded."""
    result = []
    for rank in range(world):
        loader = LatentLoader(config, batch_size=batch, rank=rank, world_size=world)
        batches = take(loader, epochs * loader.steps_per_epoch)
        for b in batches:
            assert b.latent.shape == (batch, 4, 8, 8) and b.latent.dtype.is_floating_point
            check_batch_content(b)
        steps = loader.steps_per_epoch
        result.append(
            [[k for b in batches[e * steps : (e + 1) * steps] for k in b.keys] for e in range(epochs)]
        )
    return result


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards(tmp_path):
    write_synthetic(tmp_path, UNEVEN)
    config = DataConfig(
        shards=str(tmp_path / "train-{000000..000008}.tar"), num_workers=2, shuffle_buffer=6, seed=3
    )
    world, batch = 2, 4
    steps = {
        LatentLoader(config, batch_size=batch, rank=r, world_size=world).steps_per_epoch for r in range(2)
    }
    assert len(steps) == 1  # the same number of steps on every rank
    (steps,) = steps
    assert steps == min_rank_samples(UNEVEN, world, 2) // batch
    keys = epoch_keys(config, world, batch, epochs=2)
    first = np.cumsum([0] + UNEVEN)
    for epoch in range(2):
        seen = [k for rank in range(world) for k in keys[rank][epoch]]
        assert len(seen) == len(set(seen)) == world * steps * batch  # nobody sees a sample twice
        for rank in range(world):
            # a rank reads only its own shards, and leaves out no more than the cut to equal steps
            shards = [
                s for w in range(2) for s in reader_task(UNEVEN, 3, epoch, True, rank, world, w, 2).shards
            ]
            own = {synthetic_key(n) for s in shards for n in range(first[s], first[s + 1])}
            assert set(keys[rank][epoch]) <= own
            assert len(own) - len(keys[rank][epoch]) == sum(UNEVEN[s] for s in shards) - steps * batch
    assert keys[0][0] != keys[0][1]  # a new order each epoch
    assert keys == epoch_keys(config, world, batch, epochs=2)  # and the same on a second run


@pytest.mark.slow
def test_every_sample_exactly_once_when_ranks_are_balanced(tmp_path):
    write_synthetic(tmp_path, [6] * 8)
    config = DataConfig(shards=str(tmp_path), num_workers=2, shuffle_buffer=4)
    keys = epoch_keys(config, world=2, batch=4, epochs=1)
    seen = keys[0][0] + keys[1][0]
    assert sorted(seen) == [synthetic_key(n) for n in range(48)]


def test_fewer_shards_than_readers_splits_by_sample(tmp_path):
    write_synthetic(tmp_path, [10, 9])
    config = DataConfig(shards=str(tmp_path / "manifest.json"), num_workers=0, shuffle_buffer=0)
    keys = epoch_keys(config, world=3, batch=3, epochs=1)
    seen = [k for rank in keys for k in rank[0]]
    assert len(seen) == len(set(seen)) == 3 * 2 * 3


def test_same_order_with_and_without_shuffle_buffer_content(tmp_path):
    write_synthetic(tmp_path, [8, 8])
    plain = DataConfig(shards=str(tmp_path), shuffle_shards=False)
    keys = [k for b in take(LatentLoader(plain, batch_size=4, rank=0, world_size=1), 4) for k in b.keys]
    assert keys == [synthetic_key(n) for n in range(16)]  # listed order, no shuffling
    shuffled = DataConfig(shards=str(tmp_path), shuffle_shards=False, shuffle_buffer=5, seed=1)
    again = [k for b in take(LatentLoader(shuffled, batch_size=4, rank=0, world_size=1), 4) for k in b.keys]
    assert sorted(again) == keys and again != keys


def resume_run(config, rank, world, batch, stop, total):
    loader = LatentLoader(config, batch_size=batch, rank=rank, world_size=world)
    before = take(loader, stop)
    state = json.loads(json.dumps(loader.state_dict()))  # what the trainer writes to disk
    resumed = LatentLoader(config, batch_size=batch, rank=rank, world_size=world)
    resumed.load_state_dict(state)
    after = take(resumed, total - stop)
    return [k for b in before + after for k in b.keys]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_matches_an_uninterrupted_run(tmp_path, workers):
    write_synthetic(tmp_path, UNEVEN)
    config = DataConfig(shards=str(tmp_path), num_workers=workers, shuffle_buffer=7, seed=5)
    world, batch = 2, 3
    steps = LatentLoader(config, batch_size=batch, rank=0, world_size=world).steps_per_epoch
    total = steps + steps // 2 + 2  # runs into the second epoch
    for rank in range(world):
        loader = LatentLoader(config, batch_size=batch, rank=rank, world_size=world)
        reference = [k for b in take(loader, total) for k in b.keys]
        for stop in (1, steps // 2 + 1, steps, steps + 2):
            assert resume_run(config, rank, world, batch, stop, total) == reference, (rank, stop)
