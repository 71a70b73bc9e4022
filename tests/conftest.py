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
