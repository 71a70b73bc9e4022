"""``switchdit plan``: communication and memory per rank, estimated before a job is launched.

    switchdit plan --config configs/x.yaml --nodes 4 --gpus-per-node 8 [--micro-batch 32] [--json]
    switchdit plan --model Switch-DiT-XL/2 --num-experts 8 --ep-size 8 --nodes 2 --gpus-per-node 8

Expert all-to-all. Switch-DiT routes whole samples: in every block each sample's L x D
activations go to its k experts' ranks (dispatch) and come back (combine), in the forward pass
and again, as gradients, in the backward pass; each copy is sent once per chosen expert. With
balanced routing over an expert-parallel (EP) group of P ranks, a share 1/P of that stays on the
rank, so per block and direction a rank sends ``B * L * D * k * bytes * (P - 1) / P``. EP groups
are consecutive ranks; the part of the traffic addressed to ranks on other nodes crosses the
network, the rest NVLink, and an all-to-all lasts as long as its slower part on its busiest rank.

Memory per rank, ZeRO-style accounting: parameters and gradients in the training dtype, Adam's
two fp32 moments, an fp32 master copy of the weights when training in bf16, an fp32 EMA copy.
Expert parameters are divided by the EP size. ZeRO stage 1 partitions optimizer state (moments
and master weights), stage 2 also gradients, over the data-parallel group of each parameter: all
ranks for dense parameters, the W / P ranks holding the same experts for expert parameters.
Activations are a rough figure: Korthikanti et al.'s 34 bytes per token and channel per block
for a transformer block in 16-bit with fused attention (no stored L x L scores), plus
Switch-DiT's mask, masked input and the k dispatched copies and expert outputs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

import torch

from switchdit_dist.errors import UserError
from switchdit_dist.models.dit import DiTConfig
from switchdit_dist.models.experts import EXPERT_KINDS
from switchdit_dist.models.registry import PATCH_SIZES, build_model, is_moe, model_config, parse_name
from switchdit_dist.parallel_dims import PLAN_FLAGS, ParallelDims

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FP32 = 4
ADAM_MOMENTS = 2
# Bytes of saved activations per token, channel and block of a 16-bit transformer block with
# fused attention (Korthikanti et al. 2022, without the 5 a L / D attention-score term).
BLOCK_ACTIVATION_BYTES_16BIT = 34


@dataclass
class Hardware:
    nodes: int
    gpus_per_node: int
    intra_node_gb_per_s: float = 300.0  # NVLink, effective per GPU (GB/s)
    inter_node_gbit_per_s: float = 200.0  # network per GPU (Gb/s)
    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0  # dense bf16 (H100 SXM)
    mfu: float = 0.4  # assumed model FLOPs utilisation for the compute estimate

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class PlanInputs:
    """The numbers the plan needs; from a run config or from command-line flags."""

    model: DiTConfig
    name: str
    ep_size: int = 1
    zero_stage: int = 2
    micro_batch: int = 32  # images per rank and forward pass
    global_batch: int | None = None
    dtype: str = "bf16"
    ema: bool = True
    expert_comm: str = "auto"  # parallel.expert_comm: auto, tokens or weights


@dataclass
class ExpertComm:
    """Both ways to bring samples and experts together in one block, and the one taken."""

    # What one rank sends per block in one forward pass (backward: as many again).
    tokens_bytes_per_block_pass: int  # token dispatch and combine: 2x the all-to-all estimate's figure
    weights_bytes_per_block_pass: int  # its experts, all-gathered to the other ranks
    mode: str  # parallel.expert_comm as set
    chosen: str  # tokens or weights


@dataclass
class ParamCounts:
    dense_trainable: int  # replicated on every rank (router included)
    frozen: int  # the fixed position embedding: stored, never trained
    experts_total: int  # all experts of all blocks
    experts_per_rank: int


@dataclass
class AllToAll:
    bytes_per_block_direction: int  # what one rank sends in one dispatch (or one combine)
    alltoalls_per_microstep: int  # depth x (dispatch + combine) x (forward + backward)
    bytes_per_microstep: int
    intra_node_bytes_per_microstep: int  # on the busiest rank
    inter_node_bytes_per_microstep: int
    seconds_per_microstep: float
    ep_group_spans_nodes: bool


@dataclass
class GradientReduction:
    """Data-parallel reduction once per optimizer step (ring: 2 (n-1)/n of the gradient bytes)."""

    dense_bytes: int
    expert_bytes: int
    seconds: float


@dataclass
class Memory:
    """Bytes per rank."""

    parameters: int
    gradients: int
    master_weights: int
    adam_moments: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass
class Plan:
    inputs: PlanInputs
    hardware: Hardware
    data_parallel: int
    expert_data_parallel: int
    grad_accumulation: int
    tokens_per_image: int
    params: ParamCounts
    alltoall: AllToAll
    expert_comm: ExpertComm | None  # None for a dense model
    gradient_reduction: GradientReduction
    memory: Memory
    compute_seconds_per_microstep: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["inputs"]["model"] = {"arch": "switch-dit" if is_moe(self.inputs.model) else "dit"} | asdict(
            self.inputs.model
        )
        out["memory"]["total"] = self.memory.total
        return out


# --- validation and counting --------------------------------------------------------------------


def validate(inputs: PlanInputs, hw: Hardware) -> None:
    for name, value in (
        ("--nodes", hw.nodes),
        ("--gpus-per-node", hw.gpus_per_node),
        ("micro-batch", inputs.micro_batch),
        ("ep-size", inputs.ep_size),
    ):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    for name, value in (
        ("--intra-node-gbs", hw.intra_node_gb_per_s),
        ("--inter-node-gbps", hw.inter_node_gbit_per_s),
        ("--gpu-memory-gib", hw.gpu_memory_gib),
        ("--peak-tflops", hw.peak_tflops),
        ("--mfu", hw.mfu),
    ):
        if not value > 0:
            raise UserError(f"{name} must be > 0, got {value}")
    m = inputs.model
    if m.patch_size not in PATCH_SIZES or m.input_size % m.patch_size:
        raise UserError(
            f"{inputs.name}: patch size must be one of {PATCH_SIZES} and divide the input size "
            f"{m.input_size}, got {m.patch_size}"
        )
    if inputs.dtype not in DTYPE_BYTES:
        raise UserError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {inputs.dtype!r}")
    if inputs.zero_stage not in (0, 1, 2):
        raise UserError(
            f"zero stage must be 0, 1 or 2 (DeepSpeed's ZeRO-3 does not support MoE), got {inputs.zero_stage}"
        )
    world = f"(--nodes {hw.nodes} x --gpus-per-node {hw.gpus_per_node})"
    layout_dims(inputs, hw).check(PLAN_FLAGS, world=world)


def layout_dims(inputs: PlanInputs, hw: Hardware) -> ParallelDims:
    m = inputs.model
    return ParallelDims(
        world_size=hw.world_size,
        ep_size=inputs.ep_size,
        num_experts=m.num_experts if is_moe(m) else 0,
        micro_batch=inputs.micro_batch,
        global_batch=inputs.global_batch,
    )


def count_params(config: DiTConfig, ep_size: int) -> ParamCounts:
    """Counted on the meta device (no memory, any size); experts are the blocks' ``moe`` modules."""
    with torch.device("meta"):
        model = build_model(config)
    dense = frozen = experts = 0
    for name, param in model.named_parameters():
        if ".moe." in name:
            experts += param.numel()
        elif param.requires_grad:
            dense += param.numel()
        else:
            frozen += param.numel()
    return ParamCounts(dense, frozen, experts, experts // ep_size)


# --- the estimates ------------------------------------------------------------------------------


def alltoall_bytes_per_block_direction(
    micro_batch: int, tokens: int, hidden: int, top_k: int, dtype_bytes: int, ep_size: int
) -> int:
    """Bytes one rank sends in one dispatch (or combine): the share (P-1)/P that leaves it."""
    return micro_batch * tokens * hidden * top_k * dtype_bytes * (ep_size - 1) // ep_size


def ep_peer_split(ep_size: int, gpus_per_node: int, world_size: int) -> tuple[int, int]:
    """(same-node peers, other-node peers) of the busiest rank, EP groups being consecutive ranks."""
    worst = (ep_size - 1, 0)
    for group in ParallelDims(world_size, ep_size).ep_groups():
        for rank in group:
            same = sum(
                1 for other in group if other != rank and other // gpus_per_node == rank // gpus_per_node
            )
            split = (same, ep_size - 1 - same)
            if split[1] > worst[1]:
                worst = split
    return worst


def estimate_alltoall(inputs: PlanInputs, hw: Hardware) -> AllToAll:
    m, p = inputs.model, inputs.ep_size
    if not is_moe(m) or p == 1:
        return AllToAll(0, 0, 0, 0, 0, 0.0, False)
    per_block = alltoall_bytes_per_block_direction(
        inputs.micro_batch, m.num_patches, m.hidden_size, m.top_k, DTYPE_BYTES[inputs.dtype], p
    )
    count = m.depth * 2 * 2
    total = per_block * count
    same, other = ep_peer_split(p, hw.gpus_per_node, hw.world_size)
    # Balanced routing: each peer receives the same share of what leaves the rank.
    inter = total * other // (p - 1)
    intra = total - inter
    seconds = max(intra / (hw.intra_node_gb_per_s * 1e9), inter / (hw.inter_node_gbit_per_s / 8 * 1e9))
    return AllToAll(per_block, count, total, intra, inter, seconds, other > 0)


def _ring_bytes(grad_bytes: int, group: int) -> int:
    return 2 * (group - 1) * grad_bytes // group if group > 1 else 0


def estimate_gradient_reduction(params: ParamCounts, inputs: PlanInputs, hw: Hardware) -> GradientReduction:
    b = DTYPE_BYTES[inputs.dtype]
    dims = layout_dims(inputs, hw)
    world, expert_dp = dims.data_parallel, dims.expert_data_parallel
    dense = _ring_bytes(params.dense_trainable * b, world)
    expert = _ring_bytes(params.experts_per_rank * b, expert_dp)
    # A ring over several nodes is limited by the network; inside one node, by NVLink.
    bandwidth = hw.inter_node_gbit_per_s / 8 * 1e9 if hw.nodes > 1 else hw.intra_node_gb_per_s * 1e9
    return GradientReduction(dense, expert, (dense + expert) / bandwidth)


def estimate_activations(inputs: PlanInputs) -> int:
    m = inputs.model
    b = DTYPE_BYTES[inputs.dtype]
    token_channels = inputs.micro_batch * m.num_patches * m.hidden_size
    per_block = BLOCK_ACTIVATION_BYTES_16BIT * b // 2 * token_channels
    if is_moe(m):
        per_block += (2 + 2 * m.top_k) * b * token_channels
    return m.depth * per_block


def estimate_memory(params: ParamCounts, inputs: PlanInputs, hw: Hardware) -> Memory:
    b = DTYPE_BYTES[inputs.dtype]
    dims = layout_dims(inputs, hw)
    dp, expert_dp = dims.data_parallel, dims.expert_data_parallel

    def partitioned(bytes_per_param: int, stage_from: int) -> int:
        """Bytes of a per-parameter state, divided over each parameter's data-parallel group
        when the ZeRO stage partitions it."""
        if inputs.zero_stage >= stage_from:
            return bytes_per_param * (params.dense_trainable // dp + params.experts_per_rank // expert_dp)
        return bytes_per_param * (params.dense_trainable + params.experts_per_rank)

    trainable = params.dense_trainable + params.experts_per_rank
    return Memory(
        parameters=(trainable + params.frozen) * b,
        gradients=partitioned(b, stage_from=2),
        master_weights=partitioned(FP32, stage_from=1) if inputs.dtype == "bf16" else 0,
        adam_moments=partitioned(ADAM_MOMENTS * FP32, stage_from=1),
        ema=(trainable + params.frozen) * FP32 if inputs.ema else 0,
        activations=estimate_activations(inputs),
    )


def estimate_expert_comm(inputs: PlanInputs) -> ExpertComm | None:
    from switchdit_dist.expert_comm import check_expert_comm, expert_comm_bytes

    m = inputs.model
    if not is_moe(m):
        return None
    try:
        check_expert_comm(inputs.expert_comm, m.expert_kind)
    except ValueError as err:
        raise UserError(str(err)) from None
    cost = expert_comm_bytes(m, inputs.micro_batch, inputs.ep_size, DTYPE_BYTES[inputs.dtype])
    mode = inputs.expert_comm
    chosen = cost.choice(m.expert_kind, inputs.ep_size) if mode == "auto" else mode
    return ExpertComm(cost.tokens, cost.weights, mode, chosen)


def make_plan(inputs: PlanInputs, hw: Hardware) -> Plan:
    from switchdit_dist.models.flops import forward_flops_per_image

    validate(inputs, hw)
    dims = layout_dims(inputs, hw)
    params = count_params(inputs.model, inputs.ep_size)
    alltoall = estimate_alltoall(inputs, hw)
    memory = estimate_memory(params, inputs, hw)
    # Forward + backward is about 3 forward passes.
    compute = (
        3 * forward_flops_per_image(inputs.model) * inputs.micro_batch / (hw.peak_tflops * 1e12 * hw.mfu)
    )
    plan = Plan(
        inputs=inputs,
        hardware=hw,
        data_parallel=dims.data_parallel,
        expert_data_parallel=dims.expert_data_parallel,
        grad_accumulation=dims.accumulation,
        tokens_per_image=inputs.model.num_patches,
        params=params,
        alltoall=alltoall,
        expert_comm=estimate_expert_comm(inputs),
        gradient_reduction=estimate_gradient_reduction(params, inputs, hw),
        memory=memory,
        compute_seconds_per_microstep=compute,
    )
    plan.warnings = plan_warnings(plan)
    return plan


def plan_warnings(plan: Plan) -> list[str]:
    hw, inputs, out = plan.hardware, plan.inputs, []
    if plan.alltoall.ep_group_spans_nodes:
        out.append(
            f"expert-parallel groups of {inputs.ep_size} ranks span nodes ({hw.gpus_per_node} GPUs per "
            "node): the all-to-all crosses the network; keep ep-size <= GPUs per node and a divisor of it"
        )
    if plan.alltoall.seconds_per_microstep > plan.compute_seconds_per_microstep:
        out.append(
            f"estimated all-to-all time ({_seconds(plan.alltoall.seconds_per_microstep)}) exceeds the "
            f"estimated compute ({_seconds(plan.compute_seconds_per_microstep)}) per micro-step"
        )
    budget = hw.gpu_memory_gib * 2**30
    if plan.memory.total > 0.9 * budget:
        out.append(
            f"estimated memory per rank {_gib(plan.memory.total)} exceeds 90% of {hw.gpu_memory_gib:g} "
            "GiB; lower the micro-batch, raise the ZeRO stage or the EP size"
        )
    return out


# --- presentation -------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 100 else f"{n / 2**20:.2f} MiB"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def format_plan(plan: Plan) -> str:
    i, hw, m, a = plan.inputs, plan.hardware, plan.inputs.model, plan.alltoall
    moe = f" ({m.num_experts} {m.expert_kind} experts, top-{m.top_k})" if is_moe(m) else ""
    lines = [
        f"{i.name}{moe}: {hw.nodes} node(s) x {hw.gpus_per_node} GPUs = {hw.world_size} ranks, "
        f"EP {i.ep_size}, ZeRO-{i.zero_stage}, {i.dtype}",
        f"micro-batch {i.micro_batch} images x {plan.tokens_per_image} tokens per rank"
        + (
            f"; global batch {i.global_batch} (accumulation {plan.grad_accumulation})"
            if i.global_batch
            else ""
        ),
        f"parameters: dense {plan.params.dense_trainable:,}, experts {plan.params.experts_total:,} "
        f"({plan.params.experts_per_rank:,} per rank)",
        "",
        "expert all-to-all per rank (dispatch + combine, forward + backward):",
    ]
    if a.alltoalls_per_microstep == 0:
        lines.append("  none (dense model or EP size 1)")
    else:
        lines += [
            f"  per block and direction  {_bytes(a.bytes_per_block_direction)}  "
            f"({i.micro_batch} x {plan.tokens_per_image} x {m.hidden_size} x k={m.top_k} x "
            f"{DTYPE_BYTES[i.dtype]} B x {i.ep_size - 1}/{i.ep_size} leaving the rank)",
            f"  per micro-step           {_bytes(a.bytes_per_microstep)}  "
            f"({a.alltoalls_per_microstep} all-to-alls)",
            f"  over NVLink / network    {_bytes(a.intra_node_bytes_per_microstep)} / "
            f"{_bytes(a.inter_node_bytes_per_microstep)}",
            f"  estimated time           {_seconds(a.seconds_per_microstep)} per micro-step "
            f"({hw.intra_node_gb_per_s:g} GB/s NVLink, {hw.inter_node_gbit_per_s:g} Gb/s network)",
        ]
    c = plan.expert_comm
    if c is not None and m.expert_kind != "linear":
        lines.append(
            f"expert communication (parallel.expert_comm={c.mode}): tokens "
            f"(gathering weights needs linear experts, this model's are {m.expert_kind})"
        )
    elif c is not None:
        lines += [
            f"expert communication (parallel.expert_comm={c.mode}): per block and forward pass, "
            f"tokens {_bytes(c.tokens_bytes_per_block_pass)} (dispatch and combine), "
            f"weights {_bytes(c.weights_bytes_per_block_pass)} "
            f"({m.num_experts} x ({m.hidden_size}^2 + {m.hidden_size}) x {DTYPE_BYTES[i.dtype]} B x "
            f"{i.ep_size - 1}/{i.ep_size}) -> {c.chosen}",
        ]
        if c.chosen == "weights":
            lines.append(
                "  weights: the experts are all-gathered, mixed per sample, their gradients "
                "reduce-scattered; the all-to-all above is not used"
            )
    g = plan.gradient_reduction
    lines += [
        f"compute estimate           {_seconds(plan.compute_seconds_per_microstep)} per micro-step "
        f"({hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s)",
        f"gradient reduction         {_bytes(g.dense_bytes + g.expert_bytes)} per optimizer step, "
        f"{_seconds(g.seconds)} if not overlapped",
        "",
        f"memory per rank (ZeRO-{i.zero_stage}, {i.dtype}):",
    ]
    mem = plan.memory
    for label, value in (
        ("parameters", mem.parameters),
        ("gradients", mem.gradients),
        ("fp32 master weights", mem.master_weights),
        ("Adam moments (fp32)", mem.adam_moments),
        ("EMA (fp32)", mem.ema),
        ("activations (rough)", mem.activations),
    ):
        lines.append(f"  {label:<24} {_gib(value)}")
    lines.append(f"  {'total':<24} {_gib(mem.total)} of {hw.gpu_memory_gib:g} GiB")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="YAML", help="a run config (model, parallel, train sections)")
    source.add_argument("--model", metavar="NAME", help="a named model, e.g. Switch-DiT-XL/2 or DiT-B/4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (with --config), e.g. parallel.ep_size=4; a plain KEY=VALUE, "
                             "as train, launch and submit take it, works too")  # fmt: skip
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--micro-batch", type=int, help="images per rank and forward pass (default: config or 32)"
    )
    parser.add_argument("--global-batch", type=int, help="images per optimizer step (default: from config)")
    parser.add_argument("--ep-size", type=int, help="expert-parallel group size (default: config or 1)")
    parser.add_argument("--zero-stage", type=int, help="ZeRO stage 0, 1 or 2 (default: config or 2)")
    parser.add_argument("--num-experts", type=int, help="with --model: experts per block (default 3)")
    parser.add_argument("--top-k", type=int, help="with --model: experts per sample (default 2)")
    parser.add_argument("--expert-kind", choices=EXPERT_KINDS, help="with --model: linear (paper) or mlp")
    parser.add_argument("--input-size", type=int, help="with --model: latent side (default 32, 256 px)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_BYTES), help="training dtype (default: config or bf16)"
    )
    parser.add_argument(
        "--expert-comm", choices=("auto", "tokens", "weights"), help="default: config or auto"
    )
    parser.add_argument("--no-ema", action="store_true", help="leave the fp32 EMA copy out of the memory")
    parser.add_argument("--intra-node-gbs", type=float, default=300.0, help="NVLink GB/s per GPU (300)")
    parser.add_argument("--inter-node-gbps", type=float, default=200.0, help="network Gb/s per GPU (200)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for the compute estimate")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed utilisation for the compute estimate")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _first(*values):
    return next((v for v in values if v is not None), None)


def inputs_from_args(args: argparse.Namespace) -> PlanInputs:
    if args.config:
        return _inputs_from_config(args)
    if args.overrides:
        raise UserError("--set needs --config")
    try:
        arch, size, patch = parse_name(args.model)
    except ValueError as err:
        raise UserError(f"--model: {err}") from None
    overrides = {"input_size": args.input_size} if args.input_size is not None else {}
    moe_flags = {"num_experts": args.num_experts, "top_k": args.top_k, "expert_kind": args.expert_kind}
    if arch == "switch-dit":
        overrides |= {k: v for k, v in moe_flags.items() if v is not None}
    elif any(v is not None for v in moe_flags.values()):
        raise UserError(f"--num-experts/--top-k/--expert-kind need a Switch-DiT model, got {args.model}")
    try:
        config = model_config(arch, size, patch, **overrides)
    except ValueError as err:
        raise UserError(f"--model {args.model}: {err}") from None
    return PlanInputs(
        model=config,
        name=args.model,
        ep_size=_first(args.ep_size, 1),
        zero_stage=_first(args.zero_stage, 2),
        micro_batch=_first(args.micro_batch, 32),
        global_batch=args.global_batch,
        dtype=_first(args.dtype, "bf16"),
        ema=not args.no_ema,
        expert_comm=_first(args.expert_comm, "auto"),
    )


def _inputs_from_config(args: argparse.Namespace) -> PlanInputs:
    from switchdit_dist.config import load_config

    for flag in ("num_experts", "top_k", "expert_kind", "input_size"):
        if getattr(args, flag) is not None:
            raise UserError(
                f"--{flag.replace('_', '-')} is a --model flag; with --config use --set model.{flag}=..."
            )
    config = load_config(args.config, args.overrides)
    section = config.model
    try:
        model = section.build_config()
    except ValueError as err:
        raise UserError(f"{args.config}: model: {err}") from None
    arch_name = "Switch-DiT" if section.is_moe else "DiT"
    precision = config.parallel.precision
    return PlanInputs(
        model=model,
        name=f"{arch_name}-{section.size}/{section.patch_size}",
        ep_size=_first(args.ep_size, config.parallel.ep_size),
        zero_stage=_first(args.zero_stage, config.parallel.zero_stage),
        micro_batch=_first(args.micro_batch, config.train.micro_batch),
        global_batch=_first(args.global_batch, config.train.global_batch),
        # A plan is for GPUs, where the config's "auto" means bf16.
        dtype=_first(args.dtype, precision if precision in DTYPE_BYTES else None, "bf16"),
        ema=not args.no_ema,
        expert_comm=_first(args.expert_comm, config.parallel.expert_comm),
    )


def run(args: argparse.Namespace) -> int:
    hw = Hardware(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        intra_node_gb_per_s=args.intra_node_gbs,
        inter_node_gbit_per_s=args.inter_node_gbps,
        gpu_memory_gib=args.gpu_memory_gib,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
    )
    plan = make_plan(inputs_from_args(args), hw)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0
