import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores: one thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Torch caches JIT-built extensions keyed by their include paths: two environments sharing one
# cache would rebuild them in turn. One cache per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


# `make test` hands whole files to two pytest-xdist workers in collection order. These files take
# minutes (serial seconds on 2 cores, 2026-12-03: 393, 195, 181, 135, 84, 75, 72, 48); started
# first, longest first, they leave the short files to fill in at the end, so both workers finish
# together instead of one running the replication test alone for its last three minutes.
LONG_FILES = (
    "test_train.py",
    "test_launch_lifecycle.py",
    "test_multinode.py",
    "test_replicate.py",
    "test_disk_full.py",
    "test_checkpoint_format.py",
    "test_slurm.py",
    "test_reshard.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order kept within


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The digits shards (`switchdit prepare digits`), shared by the Slurm tests."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run(
        [sys.executable, "-m", "switchdit_dist.cli", "prepare", "digits", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out / "manifest.json"
