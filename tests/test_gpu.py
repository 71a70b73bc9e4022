"""GPU checks (``pytest -m gpu``; ``tools/gpu_check.sh`` runs them on one GPU): the models and the
MoE layer in bf16 against float64 references, the communication module on a ``cpu:gloo,cuda:nccl``
group with CPU and CUDA tensors, and a bf16 ZeRO-2 engine (fused AdamW) whose EMA follows the fp32
masters. Skipped, with the reason shown, where no CUDA device is visible.

Tolerances are relative L2 errors against float64 on the CPU. bf16 keeps 8 significant bits
(relative rounding 2^-9, about 2e-3, per operation); through the layers the error grows to about
1e-2, so the bound for bf16 is 4e-2 (DiT-S/2, Switch-DiT-S/2: 12 blocks) and 2e-2 for one MoE
layer. fp32 on the GPU (TF32 off) must be within 1e-4. A bf16 error of exactly 0 would mean bf16
was not used, so the errors must also be positive.
"""

from __future__ import annotations

import os

import pytest
import torch

from switchdit_dist.models.registry import build_model, model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
    ),
]

BF16_MODEL_TOL = 4e-2
BF16_MOE_TOL = 2e-2
FP32_TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 references in true fp32 (TF32 would round matmul inputs to 10 bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: adaLN-Zero, the zero final layer and zero experts would make the
    blocks identities and the output zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("arch", ["dit", "switch-dit"])
def test_model_bf16_and_fp32_on_gpu_match_float64(arch):
    """DiT-S/2 and Switch-DiT-S/2 (all experts local, through the expert-parallel layer at EP 1, as
    the trainer builds it) in bf16 weights and inputs, as the bf16 engine runs them, and in fp32."""
    factory = ()
    if arch == "switch-dit":
        from switchdit_dist.moe.layer import expert_parallel_factory

        factory = (expert_parallel_factory(1),)
    config = model_config(arch, "S", 2)
    torch.manual_seed(0)
    model = build_model(config, *factory).eval()
    randomize_(model, 1)
    x, t, y = _inputs(8)
    with torch.no_grad():
        reference = model.double()(x.double(), t, y)
        cuda = torch.device("cuda")
        fp32 = model.float().to(cuda)(x.to(cuda), t.to(cuda), y.to(cuda))
        bf16 = model.to(torch.bfloat16)(x.to(cuda, torch.bfloat16), t.to(cuda), y.to(cuda))
    e32, e16 = rel_err(fp32, reference), rel_err(bf16.float(), reference)
    print(f"{arch}: relative error fp32 {e32:.2e}, bf16 {e16:.2e}")
    assert e32 < FP32_TOL, e32
    assert 0 < e16 < BF16_MODEL_TOL, e16


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "autocast"])
@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped_mm"])
def test_moe_layer_bf16_forward_and_backward_match_float64(grouped, autocast):
    """The expert-parallel MoE layer (EP 1: dispatch, experts, combine) in bf16 against the
    single-device reference experts in float64: outputs and the gradients of input and weights.
    MLP experts as a loop of matmuls and as grouped matmuls (``torch._grouped_mm``); bf16 weights,
    and fp32 weights under bf16 autocast (as ``switchdit train`` runs)."""
    from switchdit_dist.models.experts import LocalExperts
    from switchdit_dist.moe.layer import ExpertParallelMoE

    dim, experts, batch, tokens = 384, 4, 16, 64
    reference = LocalExperts(dim, experts, "mlp", 4.0)
    randomize_(reference, 2)
    layer = ExpertParallelMoE(dim, experts, 1, "mlp", 4.0)
    layer.load_local_experts(reference)
    layer.deepspeed_moe.grouped = grouped
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, tokens, dim, generator=gen)
    index = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(batch)])
    weight = torch.rand(batch, 2, generator=gen)
    grad_out = torch.randn(batch, tokens, dim, generator=gen)

    def run(module, dtype, device):
        module = module.to(device, dtype)
        xi = x.to(device, dtype).requires_grad_()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast and device.type == "cuda"):
            out = module(xi, index.to(device), weight.to(device, dtype))
        (out * grad_out.to(device, out.dtype)).sum().backward()
        return (
            out,
            xi.grad,
            module.local_experts[0][0].weight.grad if hasattr(module, "local_experts") else None,
        )

    ref_out, ref_grad, _ = run(reference, torch.float64, torch.device("cpu"))
    ref_w = reference.experts[0][0].weight.grad
    out, grad, w = run(layer, torch.float32 if autocast else torch.bfloat16, torch.device("cuda"))
    assert out.dtype == torch.bfloat16
    errors = {"output": rel_err(out.float(), ref_out), "grad_x": rel_err(grad.float(), ref_grad)}
    errors["grad_w"] = rel_err(w.float(), ref_w)
    print("MoE layer bf16 relative errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    for name, value in errors.items():
        assert 0 < value < BF16_MOE_TOL, (name, value)


def test_grouped_experts_are_the_default_for_bf16_on_hopper():
    from switchdit_dist.moe.grouped import grouped_mm_supported

    x = torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert grouped_mm_supported(x) == (hopper and hasattr(torch, "_grouped_mm"))
    assert not grouped_mm_supported(x.float())
    with torch.autocast("cuda", torch.bfloat16):
        assert grouped_mm_supported(x.float()) == grouped_mm_supported(x)


# --- the communication module and a bf16 engine on a cpu:gloo,cuda:nccl group ---------------------


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank group with gloo for CPU tensors and NCCL for CUDA ones, as ``switchdit train``
    creates on a GPU (``distributed.backend_spec``); DeepSpeed reuses it."""
    import torch.distributed as dist

    from switchdit_dist.train.distributed import backend_spec, free_port

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    torch.cuda.set_device(0)
    spec = backend_spec("auto", use_cuda=True)
    assert spec == "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=spec, rank=0, world_size=1)
    yield spec
    dist.barrier()
    dist.destroy_process_group()


def test_comm_collectives_on_cpu_and_cuda_tensors(nccl_group):
    from switchdit_dist.train import comm

    assert comm.active() and comm.device().type == "cuda"
    cpu = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cuda = torch.tensor([3.0, 4.0], dtype=torch.float64, device="cuda")
    comm.all_reduce_sum([cpu, cuda])  # one flat buffer through NCCL, each result back on its device
    assert cpu.device.type == "cpu" and cuda.device.type == "cuda"
    assert cpu.tolist() == [1.0, 2.0] and cuda.tolist() == [3.0, 4.0]
    values = [torch.tensor([5], dtype=torch.int64), torch.tensor([7], dtype=torch.int64, device="cuda")]
    comm.all_reduce_max(values)
    assert [v.item() for v in values] == [5, 7]
    bf16 = torch.ones(3, dtype=torch.bfloat16, device="cuda")
    comm.all_reduce_sum([bf16])
    assert bf16.tolist() == [1.0, 1.0, 1.0]
    assert comm.max_int(41) == 41
    assert comm.any_rank(True) and not comm.any_rank(False)
    with pytest.raises(ValueError, match="mixed dtypes"):
        comm.all_reduce_sum([cpu, torch.zeros(1, dtype=torch.float32)])
    comm.barrier()


def test_bf16_zero2_engine_with_fused_adamw_averages_the_fp32_masters(nccl_group):
    """The trainer's engine on one GPU: bf16, ZeRO-2, fused AdamW, tiny Switch-DiT. The EMA follows
    the fp32 masters (DeepSpeed's public full-parameter API as the reference) and its state
    assembles and reloads exactly."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from switchdit_dist.config import load_config
    from switchdit_dist.train.distributed import DistEnv
    from switchdit_dist.train.ema import EMA
    from switchdit_dist.train.engine import build_engine

    if deepspeed.get_accelerator().device_name() != "cuda":
        pytest.skip(
            f"DeepSpeed's accelerator is {deepspeed.get_accelerator().device_name()}: set DS_ACCELERATOR=cuda"
        )
    deepspeed.init_distributed(dist_backend=nccl_group)
    config = load_config(
        None,
        [
            "model.size=tiny",
            "model.input_size=16",
            "model.num_classes=10",
            "model.num_experts=4",
            "parallel.precision=bf16",
            "parallel.zero_stage=2",
            "train.global_batch=8",
            "train.micro_batch=8",
        ],
    )
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    engine, precision, guard = build_engine(config, config.model.build_config(), DistEnv(0, 1, 0, device))
    assert precision == "bf16"
    assert all(group.get("fused") for group in guard.param_groups), "AdamW must be fused on CUDA"
    decay = 0.9
    ema = EMA.from_engine(engine, decay)
    assert ema.masters and all(m.partitioned for m in ema.masters.values())
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    params = dict(engine.module.named_parameters())
    reference = {n: safe_get_full_fp32_param(params[n]).double().clone() for n in names}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 4, 16, 16, generator=gen).to(device, torch.bfloat16)
        t = torch.randint(0, 1000, (8,), generator=gen).to(device)
        y = torch.randint(0, 10, (8,), generator=gen).to(device)
        out = engine(x, t, y)
        engine.backward(out.float().pow(2).mean())
        engine.step()
        ema.update(engine.module)
        for n in names:
            reference[n].lerp_(safe_get_full_fp32_param(params[n]).double(), 1.0 - decay)
    state = ema.state_dict()
    worst = max(rel_err(state[n], reference[n]) for n in names if reference[n].norm() > 0)
    assert worst < 1e-6, worst
    again = EMA.from_engine(engine, decay)
    again.load_state_dict(state)
    assert all(torch.equal(again.state_dict()[n], state[n]) for n in state)

    # Adam state with a host step counter, as a checkpoint resume writes it: the fused kernel needs
    # it on the GPU, and the engine's AdamW moves it there before stepping.
    inner = guard
    for state_of in inner.state.values():
        state_of["step"] = state_of["step"].cpu()
    out = engine(x, t, y)
    engine.backward(out.float().pow(2).mean())
    engine.step()
    assert all(s["step"].device.type == "cuda" for s in inner.state.values())
    assert all(float(s["step"]) == 4 for s in inner.state.values())
