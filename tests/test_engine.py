"""The engine set-up's own choices: compiled blocks (``train.compile``) and the AdamW kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from switchdit_dist.config import load_config, validate
from switchdit_dist.errors import UserError
from switchdit_dist.models.registry import build_model, model_config
from switchdit_dist.train.engine import adamw_kernel, compile_blocks


def _tiny_switch_dit():
    from switchdit_dist.moe.layer import expert_parallel_factory

    config = model_config(
        "switch-dit", "tiny", 2, input_size=8, in_channels=1, num_classes=10, num_experts=4, top_k=2
    )
    torch.manual_seed(0)
    model = build_model(config, expert_parallel_factory(1))
    with torch.no_grad():  # experts start at zero; make them matter
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.normal_(std=0.05)
    return model


def test_compiled_blocks_keep_names_and_outputs_and_do_not_recompile_as_expert_counts_change():
    """Every step routes the samples differently (per-expert counts change), yet the compiled part
    (each block's attention + MLP) is one graph for all blocks and all steps. aot_eager traces the
    forward and backward as inductor does, without generating code (seconds instead of minutes)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _tiny_switch_dit()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    gen = torch.Generator().manual_seed(1)
    seen_counts = set()
    for _ in range(6):
        x = torch.randn(6, 1, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (6,), generator=gen)
        y = torch.randint(0, 10, (6,), generator=gen)
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out, gates = model(x, t, y, return_gates=True)
            out.pow(2).mean().backward()
            outs.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        seen_counts.add(tuple(torch.bincount(gates[:, 0].topk(2).indices.reshape(-1), minlength=4).tolist()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
        for g_compiled, g_eager in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
    assert len(seen_counts) > 1  # the per-expert counts did change
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compile_refuses_a_model_without_blocks():
    with pytest.raises(TypeError, match="no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_adamw_is_fused_on_cuda_only():
    assert adamw_kernel(torch.device("cpu")) == {}
    assert adamw_kernel(torch.device("cuda", 0)) == {"fused": True}


def test_train_compile_key_and_its_check(monkeypatch, tmp_path):
    import shutil

    assert load_config(None).train.compile is False
    config = load_config(None, ["train.compile=true", "train.global_batch=8", "train.micro_batch=8"])
    assert config.train.compile is True
    with pytest.raises(UserError, match="train.compile: expected bool"):
        load_config(None, ["train.compile=3"])
    if not torch.cuda.is_available():
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(shutil, "which", lambda name: None)
        with pytest.raises(
            UserError, match="train.compile=true: the inductor backend needs a C\\+\\+ compiler"
        ):
            validate(config, 1, check_data=False)
