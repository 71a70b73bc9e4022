"""``pip install .`` (not editable) gives a working ``switchdit``: build the wheel, install it into
a fresh virtual environment outside the checkout and run the user-facing commands from a folder
outside the checkout too: ``prepare digits``, ``submit --dry-run`` (packaged template and
``--template``), ``train``, ``convert`` and ``sample``.

No network: the wheel is built without build isolation (setuptools comes from the test's own
environment) and installed without dependencies. The fresh environment gets the dependencies by
a ``.pth`` file naming the test environment's site-packages. A ``.pth`` line that is a path only
adds that folder to ``sys.path``; the ``.pth`` files inside it are not run, so the editable
install's finder (``__editable__.*.pth``, which maps ``switchdit_dist`` to the checkout) never
loads, and a module missing from the wheel fails to import instead of quietly coming from the
checkout. ``test_the_wheel_copy_is_what_runs`` checks that.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "switchdit_dist"
TEMPLATE = Path(PACKAGE) / "launch" / "templates" / "slurm.sbatch.tmpl"
pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)  # nothing may point the fresh environment back at the checkout
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{output}"
    return proc


def _python_path(python: Path, key: str) -> Path:
    out = _run([python, "-c", f"import sysconfig; print(sysconfig.get_paths()[{key!r}])"], cwd=python.parent)
    return Path(out.stdout.strip())


class Installed:
    """The fresh environment with the wheel installed, and a work folder outside the checkout."""

    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        self.python = self.venv / "bin" / "python"
        # The wheel's console script (from [project.scripts]), as a user runs it.
        self.switchdit = self.venv / "bin" / "switchdit"
        self.work = root / "work"

    def cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return _run([self.switchdit, *args], cwd=self.work, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.resolve().is_relative_to(REPO), f"{root} must lie outside the checkout {REPO}"
    env = Installed(root)

    # Build from a copy of the sources: an in-tree build writes build/ and *.egg-info into the
    # checkout others work in, and a stale build/lib can carry deleted modules into the wheel.
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    )
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], cwd=root)
    (wheel,) = dist.glob("switchdit_dist-*.whl")

    _run([sys.executable, "-m", "venv", "--without-pip", env.venv], cwd=root)
    purelib = _python_path(env.python, "purelib")
    ours = [Path(p) for p in site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        ours.append(Path(site.getusersitepackages()))
    # Named to sort first: the .pth files copied below import modules that live in these folders.
    (purelib / "00-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    for folder in ours:
        for pth in folder.glob("*.pth"):
            # Others (setuptools' distutils-precedence.pth, ...) as a plain install of the
            # dependencies would have them; never an editable install's, nor one naming the checkout.
            if not pth.name.startswith("__editable__") and str(REPO) not in pth.read_text():
                shutil.copy2(pth, purelib / pth.name)
    # --python: this environment's pip installs into the fresh one (created without pip).
    # --ignore-installed: the editable install is visible through the .pth; leave it alone.
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", "--no-warn-script-location"]
    _run([*pip, "--python", env.python, *install, wheel], cwd=root)
    env.work.mkdir()
    # A user's own config, in their own folder.
    shutil.copy2(REPO / "configs" / "tiny.yaml", env.work / "my.yaml")
    env.cli("prepare", "digits", "--out", "data/digits", "--shards", "2")
    return env


def test_the_wheel_copy_is_what_runs(installed):
    probe = (
        "import json, sys, importlib.util, switchdit_dist\n"
        "print(json.dumps({'file': switchdit_dist.__file__, 'path': sys.path,\n"
        "    'finders': [repr(f) for f in sys.meta_path]}))\n"
    )
    found = json.loads(_run([installed.python, "-c", probe], cwd=installed.work).stdout)
    package = Path(found["file"]).parent
    assert package == _python_path(installed.python, "purelib") / PACKAGE, found
    assert str(REPO) not in found["path"] and "" in found["path"]  # '' is the work folder
    assert not any("editable" in f for f in found["finders"]), found["finders"]
    # Every module and the template are in the wheel (package data declared in pyproject.toml).
    wanted = {p.relative_to(REPO / PACKAGE) for p in (REPO / PACKAGE).rglob("*.py")}
    shipped = {p.relative_to(package) for p in package.rglob("*.py")}
    assert wanted <= shipped, sorted(wanted - shipped)
    assert (package.parent / TEMPLATE).read_text() == (REPO / TEMPLATE).read_text()


def test_submit_dry_run_renders_the_packaged_template_and_takes_a_site_one(installed):
    args = ["submit", "--config", "my.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2"]
    script = installed.cli(*args, "--run-dir", "runs/job", "--dry-run").stdout
    packaged = (REPO / TEMPLATE).read_text()
    assert script.splitlines()[:2] == packaged.splitlines()[:2] and "{{" not in script
    run_dir = installed.work / "runs" / "job"
    # The job runs the installed environment's interpreter, in the submitting folder.
    train = [installed.python, "-m", "switchdit_dist.cli", "train", "--config", run_dir / "job-config.yaml"]
    assert shlex.join(map(str, train)) in script
    assert f"--chdir={installed.work}\n" in script
    (installed.work / "job.sbatch").write_text(script)
    _run(["bash", "-n", "job.sbatch"], cwd=installed.work)
    assert not run_dir.exists()  # a dry run stores nothing

    site_template = installed.work / "site.sbatch.tmpl"
    site_template.write_text(
        "#!/bin/bash\n#SBATCH --job-name={{ job_name }}\nmodule load x\n{{ train_command }}\n"
    )
    script = installed.cli(*args, "--run-dir", "runs/x", "--dry-run", "--template", site_template).stdout
    assert script.splitlines()[:3] == ["#!/bin/bash", "#SBATCH --job-name=switchdit-my", "module load x"]


def test_train_convert_and_sample(installed):
    run_dir = installed.work / "runs" / "one"
    # One process: expert parallelism 1; one micro-batch per step.
    installed.cli(
        "train", "--config", "my.yaml", "--run-dir", "runs/one", "parallel.ep_size=1", "train.steps=2",
        "train.global_batch=8", "checkpoint.every=2", "logging.gate_image_every=0",
    )  # fmt: skip
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    out = installed.cli("convert", "runs/one", "model.safetensors").stdout
    assert "step 2" in out and (installed.work / "model.safetensors").is_file()
    installed.cli(
        "sample", "--checkpoint", "model.safetensors", "--classes", "0,1", "--per-class", "2", "--steps", "2",
        "--device", "cpu", "--out", "grid.png",
    )  # fmt: skip
    with Image.open(installed.work / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width == grid.height > 32  # 2 x 2 tiles of 16 px
