"""``switchdit bench train``: training-step throughput of DiT vs Switch-DiT at the same size.

One process, no DeepSpeed engine: each step is the trainer's own step (``train/step.py``: the
draws, the plan of routes and prior matching made once per step from the timesteps, the hybrid
MSE + VLB diffusion loss plus for Switch-DiT the diffusion prior loss), ``backward`` and a plain
``torch.optim.AdamW`` step. Switch-DiT is the paper's configuration (E=3 linear experts, top-2) in
the trainer's experts layer (``moe/layer.py``) at an expert-parallel size of 1.

Side by side: for every size both models (and, with ``--compile``, copies with compiled blocks,
versions) are built first, then timed in turn inside every repetition (the order reversed every
repetition), so a change in machine load hits all of them alike. Times are medians over
``--steps`` after ``--warmup`` steps; every variant sees the same inputs at the same repetition.

Reported per variant: step time, images/s, achieved train FLOP/s (matmul FLOPs of
``models/flops.py``: forward + backward = 3x forward), MFU against a matrix-multiplication peak
measured in the same run in the same dtype, and the step's peak memory: the model's parameters and
optimizer state plus the largest amount of memory the step allocated on top (CUDA: the caching
allocator's peak; CPU: every tensor storage the step creates, tracked until freed, in one extra
untimed step).

Precision as the trainer has it under DeepSpeed: bf16 weights, activations and gradients with fp32
master weights that AdamW updates (``--precision bf16``, the GPU default), or fp32 throughout.
On a GPU: the batch found by doubling until it no longer fits (``--batch auto``), DiT-XL/2 beside
Switch-DiT-XL/2 on 256 px latents (32x32x4); ``--compile`` adds compiled variants.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from switchdit_dist.bench.cpu_heap import keep_freed_memory, minor_page_faults
from switchdit_dist.devices import matmul_peak_tflops, resolve_device, synchronize
from switchdit_dist.errors import UserError
from switchdit_dist.models.registry import ARCHS, NAMES, SIZES, build_model, model_config
from switchdit_dist.train.step import Draws, Objective, draw

PRECISIONS = ("fp32", "bf16")
SDPA_CHOICES = ("auto", "math")
CPU_HEAP_CHOICES = ("keep", "release")


@dataclass
class TrainBenchConfig:
    sizes: list[str] = field(default_factory=lambda: ["S", "B"])
    patch_size: int = 2
    input_size: int = 32  # latent side: 256 px images through the SD VAE
    in_channels: int = 4
    num_classes: int = 1000
    num_experts: int = 3  # the paper's Switch-DiT
    top_k: int = 2
    batch: int | None = 4  # None: the largest power of two that fits (GPU)
    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False  # also time torch.compile'd variants
    compile_backend: str = "inductor"
    sdpa: str = "auto"  # scaled_dot_product_attention backend: auto (PyTorch picks) or math
    expert_comm: str = "auto"  # parallel.expert_comm of the trainer (auto: weight mixing, linear experts)
    cpu_heap: str = "keep"  # CPU: keep freed memory as a GPU's caching allocator does (cpu_heap.py)
    peak_matmul_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown or not self.sizes:
            raise UserError(
                f"--sizes: expected a comma-separated subset of {sorted(SIZES)}, got {self.sizes}"
            )
        if self.batch is not None and self.batch < 1:
            raise UserError(f"--batch: expected a positive integer or 'auto', got {self.batch}")
        if self.batch is None and not self.device.startswith("cuda"):
            raise UserError("--batch auto searches the largest batch that fits a GPU; on CPU give a number")
        if self.steps < 1:
            raise UserError(f"--steps: expected at least 1, got {self.steps}")
        if self.warmup < 0:
            raise UserError(f"--warmup: expected 0 or more, got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.sdpa not in SDPA_CHOICES:
            raise UserError(f"--sdpa: expected one of {SDPA_CHOICES}, got {self.sdpa!r}")
        if self.cpu_heap not in CPU_HEAP_CHOICES:
            raise UserError(f"--cpu-heap: expected one of {CPU_HEAP_CHOICES}, got {self.cpu_heap!r}")


# A smoke-test shape: 4x4 tokens of the tiny model, one timed step.
TINY = dict(sizes=["tiny"], input_size=8, num_classes=10, batch=2, steps=1, warmup=1, peak_matmul_size=256)


@dataclass
class Row:
    size: str
    model: str  # e.g. "Switch-DiT-S/2"
    arch: str
    compiled: bool
    batch: int
    tokens: int  # per image
    params: int
    step_ms: float
    images_per_s: float
    train_gflops_per_image: float
    achieved_tflops: float
    peak_tflops: float  # measured matmul peak of this device and dtype
    mfu: float
    peak_mem_mib: float | None  # None: not measured (compiled variants on CPU)
    minor_faults_per_step: float | None  # CPU: median of the timed steps' minor page faults; None on CUDA
    device: str
    precision: str


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", help="comma-separated model sizes (default S,B on CPU, XL on GPU)")
    parser.add_argument(
        "--batch", help="images per step, or 'auto' (GPU: largest power of two that fits; default 4 on CPU)"
    )
    parser.add_argument("--steps", type=int, help="timed steps per variant, median reported (default 3)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per variant first (default 1; 3 with --compile)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16 (bf16 weights, fp32 masters; default on GPU) or fp32 (default on CPU)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument(
        "--sdpa",
        choices=SDPA_CHOICES,
        default="auto",
        help="attention kernel: auto (PyTorch's choice, flash attention on recent GPUs) or math",
    )
    parser.add_argument(
        "--expert-comm",
        choices=("auto", "tokens", "weights"),
        default="auto",
        help="Switch-DiT's experts as the trainer's parallel.expert_comm runs them (default auto)",
    )
    parser.add_argument(
        "--cpu-heap",
        choices=CPU_HEAP_CHOICES,
        default="keep",
        help="CPU: keep freed memory in the process as a GPU's caching allocator does (default), or "
        "let glibc release it and every step fault its pages in again",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes, for a quick smoke run")


def config_from_args(args: argparse.Namespace) -> TrainBenchConfig:
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if args.tiny:
        values: dict = dict(TINY)
    else:
        values = dict(sizes=["XL"] if on_gpu else ["S", "B"], batch=None if on_gpu else 4)
        values.update(peak_matmul_size=8192 if on_gpu else 2048)
    # Flags given explicitly win over the defaults above.
    if args.sizes:
        values["sizes"] = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.batch is not None:
        values["batch"] = parse_batch(args.batch, on_gpu)
    if args.steps is not None:
        values["steps"] = args.steps
    if args.warmup is not None:
        values["warmup"] = args.warmup
    elif args.compile and not args.tiny:
        # Compiled Switch-DiT recompiles once the per-expert sample counts change shape.
        values["warmup"] = 3
    return TrainBenchConfig(
        **values,
        device=str(device),
        precision=args.precision or ("bf16" if on_gpu else "fp32"),
        compile=args.compile,
        sdpa=args.sdpa,
        expert_comm=args.expert_comm,
        cpu_heap=args.cpu_heap,
    )


def parse_batch(text: str, on_gpu: bool) -> int | None:
    if text == "auto":
        if not on_gpu:
            raise UserError("--batch auto searches the largest batch that fits a GPU; on CPU give a number")
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--batch: expected a positive integer or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    rows, notes = measure_all(config)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(format_table(rows, config, notes))
    return 0


# --------------------------------------------------------------------------- one training step


DIFFUSION_STEPS = 1000
CLASS_DROPOUT = 0.1  # DiT's label dropout, as the trainer's default config


@dataclass
class StepInputs:
    x0: torch.Tensor
    y: torch.Tensor
    draws: Draws  # timesteps, noise and label dropout, as the trainer draws them
    prior_seed: int


def make_inputs(config: TrainBenchConfig, batch: int, iteration: int, device: torch.device) -> StepInputs:
    """The same random latents, labels and draws for every variant at one iteration (on the host: the
    step moves them, as the trainer's does)."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
    shape = (config.in_channels, config.input_size, config.input_size)
    x0 = torch.randn((batch, *shape), generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen)
    draws = draw(gen, batch, shape, DIFFUSION_STEPS, CLASS_DROPOUT)
    return StepInputs(x0=x0, y=y, draws=draws, prior_seed=config.seed * 1_000_003 + iteration)


class TrainStep:
    """Model, AdamW and the trainer's step for one architecture; ``step(inputs)``. ``compiled``:
    the blocks compiled as ``train.compile`` does (``engine.compile_blocks``)."""

    def __init__(
        self, arch: str, size: str, config: TrainBenchConfig, device: torch.device, compiled: bool = False
    ):
        from switchdit_dist.diffusion import create_diffusion
        from switchdit_dist.moe.layer import expert_parallel_factory

        overrides = dict(
            input_size=config.input_size,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            class_dropout_prob=CLASS_DROPOUT,
        )
        if arch == "switch-dit":
            overrides.update(num_experts=config.num_experts, top_k=config.top_k)
        self.arch, self.size = arch, size
        self.model_config = model_config(arch, size, config.patch_size, **overrides)
        torch.manual_seed(config.seed)
        # The trainer's experts layer at an expert-parallel size of 1 (no process group needed).
        factory = None
        if arch == "switch-dit":
            from switchdit_dist.expert_comm import resolve_expert_comm

            value_bytes = 2 if config.precision == "bf16" else 4
            self.expert_comm = resolve_expert_comm(
                config.expert_comm, self.model_config, config.batch or 32, 1, value_bytes
            )
            factory = expert_parallel_factory(1, self.expert_comm)
        model = build_model(self.model_config, factory) if factory else build_model(self.model_config)
        self.model = model.to(device).train()
        self.device = device
        self.diffusion = create_diffusion(
            timestep_respacing="", learn_sigma=self.model_config.learn_sigma, num_timesteps=DIFFUSION_STEPS
        )
        bf16 = config.precision == "bf16"
        self.objective = Objective(
            self.diffusion, self.model_config, torch.bfloat16 if bf16 else torch.float32
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        # bf16: the module holds bf16 weights, AdamW updates fp32 masters (DeepSpeed's bf16 mode).
        self.masters = [p.detach().float().clone() for p in params] if bf16 else None
        if bf16:
            self.model.to(torch.bfloat16)
        self.params = params
        self.optimizer = torch.optim.AdamW(self.masters or params, lr=1e-4, weight_decay=0.0)
        self.compiled = compiled
        if compiled:
            from switchdit_dist.train.engine import compile_blocks

            compile_blocks(self.model, config.compile_backend)

    @property
    def name(self) -> str:
        return f"{NAMES[self.arch]}-{self.size}/{self.model_config.patch_size}"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def persistent_bytes(self) -> int:
        """Weights, buffers, fp32 masters and optimizer state: what stays allocated between steps."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + list(self.masters or [])
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def loss(self, inputs: StepInputs) -> torch.Tensor:
        """The trainer's objective (``train/step.py``) on one micro-batch: plan, then forward and loss."""
        rng = np.random.default_rng(inputs.prior_seed)
        plan = self.objective.plan(self.model, [inputs.draws.t], rng)
        batch = self.objective.inputs(inputs.x0, inputs.y, inputs.draws, self.device)
        return self.objective(self.model, batch, None if plan is None else plan[0]).loss

    def step(self, inputs: StepInputs) -> torch.Tensor:
        """One optimizer step; returns the detached loss (on the device: nothing waits for it)."""
        loss = self.loss(inputs)
        loss.backward()
        if self.masters is not None:
            for master, p in zip(self.masters, self.params):
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        return loss.detach()


# --------------------------------------------------------------------------- measuring


class StorageTracker(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive; ``peak`` is their maximum.

    CPU has no allocator statistics, so every op's outputs are checked: a storage not shared with
    the op's inputs is new, counted until it is freed (a weak reference's callback). Views and
    in-place results share their input's storage and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._alive:
            return
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_ref, key=key, size=size) -> None:
            self.live -= size
            self._alive.pop(key, None)

        self._alive[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._add(t.untyped_storage())
        return out


def timed_step(runner: TrainStep, inputs: StepInputs) -> tuple[float, float | None, int | None]:
    """Seconds of one step; on CUDA the step's peak MiB (own persistent state + what it allocated),
    on CPU its minor page faults (None where the other device applies)."""
    device = runner.device
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    faults = minor_page_faults()
    start = time.perf_counter()
    runner.step(inputs)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        return seconds, None, minor_page_faults() - faults
    extra = torch.cuda.max_memory_allocated(device) - before
    return seconds, (runner.persistent_bytes() + extra) / 2**20, None


def tracked_peak_mib(runner: TrainStep, inputs: StepInputs) -> float:
    """CPU: one untimed eager step under :class:`StorageTracker`."""
    tracker = StorageTracker()
    with tracker:
        runner.step(inputs)
    return (runner.persistent_bytes() + tracker.peak) / 2**20


SEARCH_ITERATION = 10**6  # inputs of the batch search, apart from the timed iterations'


def largest_batch(fits: Callable[[int], bool], start: int = 8, limit: int = 4096) -> int:
    """The largest power-of-two multiple of ``start`` (up to ``limit``) for which ``fits`` holds."""
    if not fits(start):
        raise UserError(f"--batch auto: not even {start} images per step fit on this device; give --batch")
    batch = start
    while batch * 2 <= limit and fits(batch * 2):
        batch *= 2
    return batch


def fits_on_gpu(runners: list[TrainStep], config: TrainBenchConfig, batch: int) -> bool:
    """One eager step of every model at ``batch``; False on an out-of-memory error."""
    device = runners[0].device
    try:
        for runner in runners:
            runner.step(make_inputs(config, batch, SEARCH_ITERATION, device))
        return True
    except torch.OutOfMemoryError:
        for runner in runners:
            runner.optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        torch.cuda.empty_cache()


def sdpa_context(choice: str):
    if choice == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def measure_size(size: str, config: TrainBenchConfig, peak_tflops: float) -> list[Row]:
    from switchdit_dist.models.flops import train_flops_per_image

    device = torch.device(config.device)
    runners = [TrainStep(arch, size, config, device) for arch in ARCHS]
    eager = list(runners)
    if config.compile:  # own models with the same seed: the same weights, compiled blocks
        runners += [TrainStep(arch, size, config, device, compiled=True) for arch in ARCHS]
    batch = config.batch or largest_batch(lambda b: fits_on_gpu(eager, config, b))
    variants = [(runner, runner.compiled) for runner in runners]
    times: dict[tuple[str, bool], list[float]] = {(r.arch, c): [] for r, c in variants}
    faults: dict[tuple[str, bool], list[float]] = {(r.arch, c): [] for r, c in variants}
    peaks: dict[tuple[str, bool], float] = {}
    for i in range(config.warmup):
        inputs = make_inputs(config, batch, i, device)
        for runner, _ in variants:
            runner.step(inputs)
    if device.type != "cuda":
        # The tracker follows eager ops only, so on CPU compiled variants get no memory figure.
        inputs = make_inputs(config, batch, config.warmup, device)
        for runner in eager:
            peaks[(runner.arch, False)] = tracked_peak_mib(runner, inputs)
    # Round-robin over the variants, so that a change in machine load hits all of them, in an
    # order reversed every repetition: on a CPU a step's time depends on which model ran just before
    # it (profiled self CPU time of Switch-DiT-S/2 over DiT-S/2: 1.33x with DiT first, 1.16x with
    # Switch-DiT first), so each variant takes each position equally often.
    for i in range(config.steps):
        inputs = make_inputs(config, batch, config.warmup + 1 + i, device)
        for runner, compiled in variants if i % 2 == 0 else variants[::-1]:
            key = (runner.arch, compiled)
            seconds, peak, step_faults = timed_step(runner, inputs)
            times[key].append(seconds)
            if peak is not None:
                peaks[key] = max(peaks.get(key, 0.0), peak)
            if step_faults is not None:
                faults[key].append(step_faults)
    rows = []
    for runner, compiled in variants:
        step_s = statistics.median(times[(runner.arch, compiled)])
        step_faults = faults[(runner.arch, compiled)]
        flops = train_flops_per_image(runner.model_config)
        achieved = batch / step_s * flops / 1e12
        rows.append(
            Row(
                size=size,
                model=runner.name,
                arch=runner.arch,
                compiled=compiled,
                batch=batch,
                tokens=runner.model_config.num_patches,
                params=runner.num_params(),
                step_ms=round(step_s * 1e3, 3),
                images_per_s=round(batch / step_s, 3),
                train_gflops_per_image=round(flops / 1e9, 4),
                achieved_tflops=round(achieved, 5),
                peak_tflops=round(peak_tflops, 5),
                mfu=round(achieved / peak_tflops, 5),
                peak_mem_mib=_round_or_none(peaks.get((runner.arch, compiled)), 1),
                minor_faults_per_step=statistics.median(step_faults) if step_faults else None,
                device=config.device,
                precision=config.precision,
            )
        )
    return rows


def _round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def measure_all(config: TrainBenchConfig) -> tuple[list[Row], dict]:
    device = torch.device(config.device)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    # Before anything is allocated, so that every tensor of the run comes from the heap as set here
    # (for the rest of this process: a benchmark command's own).
    heap_kept = device.type != "cuda" and config.cpu_heap == "keep" and keep_freed_memory()
    peak = matmul_peak_tflops(device, dtype, config.peak_matmul_size)
    notes = {"threads": torch.get_num_threads(), "peak_tflops": peak, "matmul_size": config.peak_matmul_size}
    if device.type == "cuda":
        notes["gpu"] = torch.cuda.get_device_name(device)
    else:
        if heap_kept:
            notes["heap"] = "freed memory kept (mallopt)"
        elif config.cpu_heap == "keep":
            notes["heap"] = "the C library's default (no glibc mallopt here)"
        else:
            notes["heap"] = "freed memory released (glibc's default)"
    rows = []
    with sdpa_context(config.sdpa):
        for size in config.sizes:
            rows += measure_size(size, config, peak)
    return rows, notes


# --------------------------------------------------------------------------- output


def format_table(rows: list[Row], config: TrainBenchConfig, notes: dict) -> str:
    first = rows[0]
    where = notes.get("gpu") or f"{config.device}, {notes['threads']} thread(s)"
    precision = "bf16 weights, fp32 masters" if config.precision == "bf16" else "fp32"
    lines = [
        f"Training step (diffusion loss + prior loss for Switch-DiT, AdamW), DiT vs Switch-DiT "
        f"(E={config.num_experts}, k={config.top_k}, linear experts, expert_comm={config.expert_comm}); "
        f"{first.tokens} tokens per image; "
        f"{precision}; {where}; attention {config.sdpa}; median of {config.steps} step(s) after "
        f"{config.warmup} warm-up",
        f"matmul peak measured in this run: {notes['peak_tflops']:.4f} TFLOP/s "
        f"({config.precision}, {notes['matmul_size']}x{notes['matmul_size']})"
        + (f"; CPU heap: {notes['heap']}" if "heap" in notes else ""),
        "",
        f"{'model':<17}{'compile':>8}{'batch':>6}{'params':>9}{'step ms':>10}{'img/s':>9}"
        f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}"
        + (f"{'faults':>9}" if "heap" in notes else ""),
    ]
    by_key = {(r.size, r.arch, r.compiled): r for r in rows}
    for size in config.sizes:
        for compiled in sorted({r.compiled for r in rows}):
            dit, switch = by_key[(size, "dit", compiled)], by_key[(size, "switch-dit", compiled)]
            for r in (dit, switch):
                memory = "-" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}"
                faults = "" if r.minor_faults_per_step is None else f"{r.minor_faults_per_step:>9.0f}"
                lines.append(
                    f"{r.model:<17}{'on' if compiled else 'off':>8}{r.batch:>6}{r.params / 1e6:>8.1f}M"
                    f"{r.step_ms:>10.1f}{r.images_per_s:>9.2f}{r.train_gflops_per_image:>11.2f}"
                    f"{r.achieved_tflops:>9.4f}{r.mfu:>7.3f}{memory:>10}{faults}"
                )
            memory_ratio = (
                "-"
                if switch.peak_mem_mib is None or dit.peak_mem_mib is None
                else f"{switch.peak_mem_mib / dit.peak_mem_mib:.3f}"
            )
            lines.append(
                f"{'  Switch / DiT':<31}{switch.params / dit.params:>9.3f}"
                f"{switch.step_ms / dit.step_ms:>10.3f}{switch.images_per_s / dit.images_per_s:>9.3f}"
                f"{switch.train_gflops_per_image / dit.train_gflops_per_image:>11.3f}"
                f"{switch.achieved_tflops / dit.achieved_tflops:>9.3f}{switch.mfu / dit.mfu:>7.3f}"
                f"{memory_ratio:>10}"
            )
    lines.append(
        "peak MiB: weights + optimizer state + the most the step allocates on top (CUDA: allocator peak; "
        "CPU: tensor storages of an eager step, tracked until freed)"
    )
    if "heap" in notes:
        lines.append("faults: minor page faults per timed step (median): pages the kernel maps and zeroes")
    return "\n".join(lines)
