"""The stages of ``tools/gpu_check.sh``: the one-GPU acceptance run (at most 8 minutes).

Run through ``tools/gpu_check.sh``, which installs the carried wheels first. Stages, each with its
own time limit inside one overall budget, each reported in ``$OUT/gpu_check.json`` (rewritten after
every stage, so a run cut short still leaves what it did):

1. ``env``: Python, torch, CUDA, GPU, DeepSpeed and webdataset versions.
2. ``pytest_gpu``: ``pytest -m gpu`` (bf16 models and MoE layer against float64, the communication
   module on a ``cpu:gloo,cuda:nccl`` group, a bf16 ZeRO-2 engine with fused AdamW and its EMA).
3. ``data``: synthetic latents [4, 32, 32] written as shards by ``switchdit prepare npy``.
4. ``train``: ``switchdit train`` of Switch-DiT-S/2, bf16, ZeRO-2: run A 60 steps with a
   checkpoint at 30 (host syncs counted, below); run B 30 steps beside it, then B again to 60, which
   resumes from B's step 30. ``resume`` compares the metrics of steps 31-60 of A and B bit for bit
   (and steps 1-30, which tells GPU non-determinism from a resume fault) and the converted model
   and EMA weights at step 60.
5. ``syncs``: host synchronisations per optimizer step, counted in run A with
   ``torch.cuda.set_sync_debug_mode("warn")`` between consecutive EMA updates (one per step),
   leaving out the first steps and every step that follows a logging or checkpoint step (their
   work runs after the EMA update); at most 2 pass. The most frequent call sites are listed.
6. ``convert`` and ``sample``: the EMA weights of A as one file, and a small grid from it.
7. ``bench_moe``: ``switchdit bench moe --device cuda``: one MoE layer (S, B, XL; EP 1, bf16) with
   token dispatch, gathered weights, DeepSpeed's layer and the dense equivalent, and MLP experts as a
   loop against grouped matmuls.
8. ``bench``: ``switchdit bench train --device cuda --sizes XL --compile``: img/s, MFU and peak
   memory of DiT-XL/2 and Switch-DiT-XL/2 side by side.

Without CUDA the GPU stages are skipped with the reason (pytest runs and reports its skips), and the
check passes; ``--cpu-smoke`` runs the same stages on a tiny model on the CPU instead, to test the
check itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
SYNC_LIMIT = 2
# Metrics that a deterministic run reproduces exactly (timings and memory do not).
EXACT_METRIC = re.compile(r"^(step$|loss|mse|vlb|prior|grad_norm|lr$|route_frac|skipped)")


class Check:
    def __init__(self, work: Path, out: Path | None, smoke: bool, deadline: float, notes: dict):
        self.work, self.out, self.smoke, self.deadline = work, out, smoke, deadline
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        import torch

        self.cuda = torch.cuda.is_available()
        self.gpu = self.cuda or smoke
        self.summary: dict = {
            "ok": None,
            "mode": "gpu" if self.cuda else ("cpu-smoke" if smoke else "cpu"),
            "budget_s": round(deadline - time.time()),
            "install": notes,
            "stages": {},
        }
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cuda" if self.cuda else "cpu")
        if not self.cuda:
            self.env["OMP_NUM_THREADS"] = "1"

    # --- bookkeeping ---------------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, name: str, status: str, seconds: float, **details) -> dict:
        entry = {"status": status, "seconds": round(seconds, 1), **details}
        self.summary["stages"][name] = entry
        mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip", "timeout": "TIME"}.get(status, status)
        reason = details.get("reason") or details.get("error") or ""
        print(f"[gpu_check] {mark} {name} ({seconds:.0f}s){': ' + str(reason) if reason else ''}", flush=True)
        self.write()
        return entry

    def write(self) -> None:
        failed = [n for n, s in self.summary["stages"].items() if s["status"] in ("fail", "timeout")]
        self.summary["ok"] = not failed
        self.summary["failed"] = failed
        self.summary["elapsed_s"] = round(time.time() - START, 1)
        text = json.dumps(self.summary, indent=2, default=str)
        (self.work / "gpu_check.json").write_text(text)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_check.json").write_text(text)

    def skip_reason(self) -> str | None:
        if self.gpu:
            return None
        return "no CUDA device (torch.cuda.is_available() is False); GPU stages need one"

    def run(self, name: str, cmd: list[str], cap: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run ``cmd`` with at most ``cap`` seconds (and what is left of the budget); output to a log.
        Returns (exit code or None on timeout, output tail)."""
        limit = max(min(cap, self.left() - 5), 1)
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                proc = subprocess.run(
                    cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT, timeout=limit
                )
                code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        return code, log.read_text()[-4000:]

    def run_together(self, jobs: dict[str, list[str]], cap: float) -> dict[str, int | None]:
        """Start every job at once (each logging to ``logs/NAME.log``) and wait for all, within one
        shared limit; exit codes by name, None for a job that was still running at the limit."""
        end = time.time() + max(min(cap, self.left() - 5), 1)
        logs = {name: open(self.logs / f"{name}.log", "w") for name in jobs}
        procs = {}
        for name, cmd in jobs.items():
            logs[name].write("$ " + " ".join(cmd) + "\n")
            logs[name].flush()
            procs[name] = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=logs[name], stderr=subprocess.STDOUT
            )
        codes: dict[str, int | None] = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(end - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
            logs[name].close()
        return codes

    def tail(self, name: str, chars: int = 2500) -> str:
        log = self.logs / f"{name}.log"
        return log.read_text(errors="replace")[-chars:] if log.is_file() else ""

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def switchdit(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "switchdit_dist.cli", *args]

    def copy_logs(self) -> None:
        if self.out is None:
            return
        # One archive: the device tool brings back at most 8 files.
        with tarfile.open(self.out / "gpu_check_logs.tar.gz", "w:gz") as tar:
            for log in sorted(self.logs.glob("*.log")):
                data = log.read_bytes()[-200_000:]
                info = tarfile.TarInfo(f"gpu_check_logs/{log.name}")
                info.size, info.mtime = len(data), int(log.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))


START = time.time()


# --- stages -------------------------------------------------------------------------------------


def stage_env(c: Check) -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if c.cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("deepspeed", "webdataset", "pydantic"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
            info[f"{name}_from"] = str(Path(module.__file__).parent)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            info[name] = f"not importable: {err}"
    ok = all(not str(info[n]).startswith("not importable") for n in ("deepspeed", "webdataset"))
    c.record("env", "pass" if ok else "fail", 0.0, **info)


def stage_pytest(c: Check) -> None:
    start = time.time()
    cmd = c.python("-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py")
    code, tail = c.run("pytest_gpu", cmd, 150)
    seconds = time.time() - start
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", tail)))
    if code is None:
        c.record("pytest_gpu", "timeout", seconds, counts=counts, tail=tail[-1500:])
    elif code == 0 and counts.get("passed", 0) == 0 and counts.get("skipped", 0):
        c.record("pytest_gpu", "skip", seconds, counts=counts, reason="; ".join(reasons))
    else:
        status = "pass" if code == 0 else "fail"
        detail = {} if code == 0 else {"tail": tail[-3000:]}
        c.record("pytest_gpu", status, seconds, counts=counts, skip_reasons=reasons, **detail)


def _shape(c: Check) -> tuple[int, int, int]:
    return (1, 16, 16) if c.smoke and not c.cuda else (4, 32, 32)


def stage_data(c: Check) -> Path | None:
    start = time.time()
    import numpy as np

    channels, size, _ = _shape(c)
    classes = 10 if c.smoke and not c.cuda else 1000
    src = c.work / "latents_npy"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(8):  # 8 files of 128 latents: 1,024 samples, 8 shards
        name = f"part_{i:02d}.npy"
        np.save(src / name, rng.standard_normal((128, channels, size, size)).astype(np.float16))
        labels[name] = rng.integers(0, classes, 128).tolist()
    (c.work / "labels.json").write_text(json.dumps(labels))
    out = c.work / "latents"
    shutil.rmtree(out, ignore_errors=True)
    cmd = c.switchdit(
        "prepare", "npy", "--src", str(src), "--out", str(out), "--labels", str(c.work / "labels.json"),
        "--num-classes", str(classes), "--samples-per-shard", "128",
    )  # fmt: skip
    code, tail = c.run("data", cmd, 60)
    manifest = out / "manifest.json"
    if code == 0 and manifest.is_file():
        c.record("data", "pass", time.time() - start, manifest=str(manifest), samples=1024)
        return manifest
    c.record("data", "timeout" if code is None else "fail", time.time() - start, tail=tail[-2000:])
    return None


def train_overrides(c: Check, manifest: Path, steps: int) -> list[str]:
    if c.cuda:
        config = "configs/imagenet256/switch-dit-s-2.yaml"
        batch = ["train.global_batch=32", "train.micro_batch=32"]
        every, ckpt, precision = 5, 30, "bf16"
    else:  # --cpu-smoke: the tiny model, fp32 (bf16 is slow on CPU), a few steps
        config = "configs/tiny.yaml"
        batch = ["train.global_batch=8", "train.micro_batch=8", "parallel.ep_size=1"]
        every, ckpt, precision = 1, 3, "fp32"
        steps = steps // 10
    return [
        "--config", config, f"data.shards={manifest}", "data.num_workers=2", "data.shuffle_buffer=256",
        f"parallel.precision={precision}", "parallel.zero_stage=2", *batch, f"train.steps={steps}",
        f"checkpoint.every={ckpt}", "checkpoint.keep=3", f"logging.every={every}",
        "logging.gate_image_every=0", "logging.val_every=0", "logging.progress=false",
    ]  # fmt: skip


def _metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["step"])] = {k: v for k, v in row.items() if EXACT_METRIC.match(k)}
    return rows


def _compare(a: dict[int, dict], b: dict[int, dict], steps: range) -> dict:
    logged = [s for s in steps if s in a]
    missing = [s for s in logged if s not in b]
    differing = []
    for s in logged:
        if s in b and a[s] != b[s]:
            keys = sorted(k for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k))
            loss = (a[s].get("loss"), b[s].get("loss"))
            differing.append({"step": s, "keys": keys[:8], "loss_a_b": loss})
    return {
        "compared_steps": logged,
        "missing_in_b": missing,
        "differing": differing[:5],
        "identical": bool(logged) and not missing and not differing,
    }


def stage_train(c: Check, manifest: Path) -> dict | None:
    """Runs A (60 steps, syncs counted) and B1 (30 steps) side by side, then B2 (resume to 60)."""
    start = time.time()
    run_a, run_b = c.work / "run_a", c.work / "run_b"
    for d in (run_a, run_b):
        shutil.rmtree(d, ignore_errors=True)
    syncs_json = c.work / "syncs.json"
    cmd_a = c.python(
        str(ROOT / "tools" / "gpu_check.py"), "count-syncs", "--out", str(syncs_json), "--",
        "train", "--run-dir", str(run_a), *train_overrides(c, manifest, 60),
    )  # fmt: skip
    cmd_b1 = c.switchdit("train", "--run-dir", str(run_b), *train_overrides(c, manifest, 30))
    codes = c.run_together({"train_a": cmd_a, "train_b1": cmd_b1}, 200)
    if all(code == 0 for code in codes.values()):
        cmd_b2 = c.switchdit("train", "--run-dir", str(run_b), *train_overrides(c, manifest, 60))
        codes.update(c.run_together({"train_b2": cmd_b2}, 120))
    seconds = time.time() - start
    tails = {name: c.tail(name) for name in codes}
    if not all(code == 0 for code in codes.values()):
        status = "timeout" if None in codes.values() else "fail"
        bad = {n: tails[n] for n, code in codes.items() if code != 0}
        c.record("train", status, seconds, exit_codes=codes, tails=bad)
        return None
    resumed = "resumed from step" in tails.get("train_b2", "")
    c.record("train", "pass", seconds, exit_codes=codes, b2_resumed=resumed)
    return {"a": run_a, "b": run_b, "syncs": syncs_json, "resumed": resumed}


def stage_resume(c: Check, runs: dict) -> None:
    start = time.time()
    half = 30 if c.cuda else 3
    total = 2 * half
    a, b = _metrics(runs["a"]), _metrics(runs["b"])
    resumed = _compare(a, b, range(half + 1, total + 1))
    fresh = _compare(a, b, range(1, half + 1))
    outputs = {(run, kind): c.work / f"{run}_{kind}.safetensors" for run in "ab" for kind in ("ema", "model")}
    jobs = {
        f"convert_{run}_{kind}": c.switchdit("convert", str(runs[run]), str(out), "--weights", kind)
        for (run, kind), out in outputs.items()
    }
    codes = c.run_together(jobs, 150)
    weights = {
        key: out if codes[f"convert_{key[0]}_{key[1]}"] == 0 and out.is_file() else None
        for key, out in outputs.items()
    }
    same_weights = {}
    for kind in ("ema", "model"):
        pa, pb = weights[("a", kind)], weights[("b", kind)]
        if pa and pb:
            same_weights[kind] = _same_tensors(pa, pb)
        else:
            failed = {n: codes[n] for n in (f"convert_a_{kind}", f"convert_b_{kind}") if codes[n] != 0}
            same_weights[kind] = f"convert failed (exit codes {failed}; None: timed out)"
    converted = all(v is not None for v in weights.values())
    ok = resumed["identical"] and runs["resumed"] and all(v is True for v in same_weights.values())
    c.summary["artifacts"] = {"ema_a": str(weights[("a", "ema")])}
    c.record(
        "resume",
        "pass" if ok else "fail",
        time.time() - start,
        b_resumed_from_checkpoint=runs["resumed"],
        steps_after_resume=resumed,
        steps_before_checkpoint_two_fresh_runs=fresh,
        final_weights_identical=same_weights,
        converted=converted,
        note="steps_before_checkpoint compares two uninterrupted runs: if they differ too, the GPU "
        "kernels are not run-to-run deterministic and resume cannot be bit-exact either",
    )


def _same_tensors(a: Path, b: Path) -> bool | str:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f"different names ({len(ta)} vs {len(tb)})"
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    if differing:
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in differing)
        return f"{len(differing)} of {len(ta)} tensors differ (max abs {worst:.3g}), e.g. {differing[:3]}"
    return True


def stage_syncs(c: Check, runs: dict) -> None:
    if not c.cuda:
        c.record("syncs", "skip", 0.0, reason="torch.cuda.set_sync_debug_mode needs CUDA")
        return
    data = json.loads(runs["syncs"].read_text())
    every, ckpt = 5, 30
    steady = [
        w for w in data["windows"] if w["step"] >= 3 and (w["step"] - 1) % every and (w["step"] - 1) % ckpt
    ]
    if not steady:
        c.record("syncs", "fail", 0.0, error="no steady steps were counted", windows=data["windows"][:5])
        return
    counts = [w["syncs"] for w in steady]
    sources: Counter = Counter()
    for w in steady:
        sources.update(w["sources"])
    worst = max(counts)
    c.record(
        "syncs",
        "pass" if worst <= SYNC_LIMIT else "fail",
        0.0,
        limit=SYNC_LIMIT,
        max_per_step=worst,
        median_per_step=sorted(counts)[len(counts) // 2],
        counted_steps=[w["step"] for w in steady],
        per_step=counts,
        all_windows={w["step"]: w["syncs"] for w in data["windows"]},
        top_sources_per_step={k: round(v / len(steady), 2) for k, v in sources.most_common(12)},
    )


def stage_sample(c: Check) -> None:
    start = time.time()
    ema = c.summary.get("artifacts", {}).get("ema_a")
    if not ema or ema == "None":
        c.record("sample", "skip", 0.0, reason="no converted EMA model (see resume)")
        return
    grid = (c.out or c.work) / "gpu_check_samples.png"
    steps = "20" if c.cuda else "5"
    cmd = c.switchdit(
        "sample", "--checkpoint", ema, "--classes", "0,1", "--per-class", "2", "--steps", steps,
        "--sampler", "ddim", "--seed", "0", "--out", str(grid),
    )  # fmt: skip
    code, tail = c.run("sample", cmd, 90)
    ok = code == 0 and grid.is_file()
    status = "pass" if ok else ("timeout" if code is None else "fail")
    c.record("sample", status, time.time() - start, grid=str(grid), **({} if ok else {"tail": tail[-2000:]}))


def _json_rows(tail: str) -> list | None:
    """The last line of ``tail`` that parses as a JSON list (a benchmark's ``--json`` output)."""
    for line in reversed(tail.splitlines()):
        if line.startswith("["):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None


def stage_bench_moe(c: Check) -> None:
    start = time.time()
    if c.cuda:
        cmd = c.switchdit("bench", "moe", "--device", "cuda", "--repeats", "20", "--json")
    else:
        cmd = c.switchdit("bench", "moe", "--tiny", "--repeats", "1", "--json")
    code, tail = c.run("bench_moe", cmd, 150)
    rows = _json_rows(tail)
    if code != 0 or rows is None:
        c.record("bench_moe", "timeout" if code is None else "fail", time.time() - start, tail=tail[-2500:])
        return
    c.record("bench_moe", "pass", time.time() - start, rows=rows)


def stage_bench(c: Check) -> None:
    start = time.time()
    if c.cuda:
        cmd = c.switchdit("bench", "train", "--device", "cuda", "--sizes", "XL", "--compile", "--json")
    else:
        cmd = c.switchdit("bench", "train", "--device", "cpu", "--tiny", "--json")
    if c.left() < 30:
        c.record("bench", "timeout", 0.0, error=f"only {c.left():.0f}s of the budget left")
        return
    code, tail = c.run("bench", cmd, 600)
    seconds = time.time() - start
    rows = _json_rows(tail)
    if code != 0 or rows is None:
        c.record("bench", "timeout" if code is None else "fail", seconds, tail=tail[-2500:])
        return
    keep = ("model", "compiled", "batch", "images_per_s", "mfu", "peak_mem_mib", "step_ms", "precision")
    c.record("bench", "pass", seconds, rows=[{k: r.get(k) for k in keep} for r in rows])


def main_check(args: argparse.Namespace) -> int:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(args.work)
    started = float(os.environ.get("GPU_CHECK_START", START))
    notes = json.loads(args.install) if args.install else {}
    c = Check(work, out, args.cpu_smoke, started + args.budget, notes)
    try:
        stage_env(c)
        stage_pytest(c)
        reason = c.skip_reason()
        if reason:
            for name in ("data", "train", "resume", "syncs", "sample", "bench_moe", "bench"):
                c.record(name, "skip", 0.0, reason=reason)
        else:
            manifest = stage_data(c)
            runs = stage_train(c, manifest) if manifest else None
            if runs:
                stage_resume(c, runs)
                stage_syncs(c, runs)
                stage_sample(c)
            else:
                for name in ("resume", "syncs", "sample"):
                    c.record(name, "skip", 0.0, reason="training did not complete")
            stage_bench_moe(c)
            stage_bench(c)
    finally:
        c.write()
        c.copy_logs()
    print(
        f"[gpu_check] {'PASSED' if c.summary['ok'] else 'FAILED'} in {time.time() - started:.0f}s", flush=True
    )
    if c.summary["failed"]:
        print(f"[gpu_check] failed stages: {', '.join(c.summary['failed'])}", flush=True)
    print(f"[gpu_check] summary: {(out or work) / 'gpu_check.json'}", flush=True)
    return 0 if c.summary["ok"] else 1


# --- counting host syncs inside `switchdit train` -----------------------------------------------


def main_count_syncs(args: argparse.Namespace) -> int:
    """``switchdit train`` in this process, with every CUDA host synchronisation counted per
    optimizer step: the EMA update marks the end of each step; counting starts after step 1."""
    import traceback
    import warnings

    import torch

    from switchdit_dist import cli
    from switchdit_dist.train import ema as ema_module

    state = {"step": 0, "count": 0, "sources": Counter(), "on": False}
    windows: list[dict] = []
    update = ema_module.EMA.update

    def counted_update(self, model):
        update(self, model)
        state["step"] += 1
        if state["on"]:
            windows.append(
                {
                    "step": state["step"],
                    "syncs": state["count"],
                    "sources": dict(state["sources"].most_common(6)),
                }
            )
        state["count"], state["sources"] = 0, Counter()
        if not state["on"] and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
            state["on"] = True

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        state["count"] += 1
        ours = [
            f
            for f in traceback.extract_stack()[:-1]
            if "switchdit_dist" in f.filename or "/deepspeed/" in f.filename
        ]
        where = ours[-1] if ours else None
        site = (
            f"{_short(where.filename)}:{where.lineno} {where.name}"
            if where
            else f"{_short(filename)}:{lineno}"
        )
        state["sources"][site] += 1

    ema_module.EMA.update = counted_update
    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchroniz.*")
    try:
        code = cli.main(args.train_args)
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        Path(args.out).write_text(json.dumps({"windows": windows, "steps": state["step"]}))
    return code


def _short(path: str) -> str:
    for marker in ("switchdit_dist/", "deepspeed/", "torch/"):
        if marker in path:
            return marker + path.split(marker, 1)[1]
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["count-syncs"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py count-syncs")
        parser.add_argument("--out", required=True)
        split = argv.index("--")
        args = parser.parse_args(argv[1:split])
        args.train_args = argv[split + 1 :]
        return main_count_syncs(args)
    parser = argparse.ArgumentParser(description="one-GPU acceptance run (see tools/gpu_check.sh)")
    parser.add_argument("--work", required=True, help="scratch folder (runs, logs)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    parser.add_argument("--install", default="", help="JSON notes of the wheel installation")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="without CUDA: run the stages on a tiny model"
    )
    return main_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
