import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores: one thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds a shared-memory op on first use and torch caches the build keyed by its
# include paths: two environments sharing one cache rebuild it in turn. One cache per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def deepspeed_ops_built() -> None:
    """Build DeepSpeed's CPU op once, before tests whose jobs would otherwise each build it inside
    their time limits (about 30 s alone, minutes on a loaded machine)."""
    code = "from switchdit_dist.train import distributed; distributed.setup(); distributed.teardown()"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


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
