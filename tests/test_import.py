"""Importing public DiT / Switch-DiT weights, safe loading, and the one-file model format.

The source checkpoints are built here in the public layouts (facebookresearch/DiT ``models.py``,
byeongjun-park/Switch-DiT ``models/DiT/models.py`` + ``models/MoE.py``): same key names and
shapes, random values in every tensor. ``reference_forward`` recomputes those models'
arithmetic from the raw tensors with plain torch ops, independently of our model code.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from switchdit_dist.cli import main as cli_main
from switchdit_dist.errors import UserError
from switchdit_dist.export.importer import ImportOptions, import_weights
from switchdit_dist.export.load import load_model, read_model_metadata, save_model_file
from switchdit_dist.export.safe_load import InertRecord, safe_load
from switchdit_dist.models.dit import DiTConfig, sincos_pos_embed_2d
from switchdit_dist.models.registry import build_model, model_config
from switchdit_dist.models.switch_dit import SwitchDiT, SwitchDiTConfig

T = 1000  # diffusion timesteps (the Switch-DiT code's taskcount)


# ----------------------------------------------------------------------------- source layouts


def official_dit_state(
    depth=2,
    hidden=64,
    patch=2,
    in_ch=4,
    grid=4,
    num_classes=10,
    null_class=True,
    learn_sigma=True,
    seed=0,
    meta=False,
) -> dict[str, torch.Tensor]:
    """Every tensor of facebookresearch/DiT's ``DiT`` (timm PatchEmbed/Attention/Mlp names), random
    (or, with ``meta``, shapes only: for full-size layouts)."""
    g = torch.Generator().manual_seed(seed)
    out_ch = in_ch * 2 if learn_sigma else in_ch
    shapes = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + int(null_class), hidden),
    }
    for n in range(depth):
        shapes.update(
            {
                f"blocks.{n}.attn.qkv.weight": (3 * hidden, hidden),
                f"blocks.{n}.attn.qkv.bias": (3 * hidden,),
                f"blocks.{n}.attn.proj.weight": (hidden, hidden),
                f"blocks.{n}.attn.proj.bias": (hidden,),
                f"blocks.{n}.mlp.fc1.weight": (4 * hidden, hidden),
                f"blocks.{n}.mlp.fc1.bias": (4 * hidden,),
                f"blocks.{n}.mlp.fc2.weight": (hidden, 4 * hidden),
                f"blocks.{n}.mlp.fc2.bias": (hidden,),
                f"blocks.{n}.adaLN_modulation.1.weight": (6 * hidden, hidden),
                f"blocks.{n}.adaLN_modulation.1.bias": (6 * hidden,),
            }
        )
    shapes.update(
        {
            "final_layer.linear.weight": (patch * patch * out_ch, hidden),
            "final_layer.linear.bias": (patch * patch * out_ch,),
            "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
            "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
        }
    )
    if meta:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: torch.randn(s, generator=g) / math.sqrt(s[-1] if len(s) > 1 else 8) for k, s in shapes.items()}


def prior_unit_mapping(depth: int, num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch-DiT code's ``create_mask_tasks(depth*E, T, beta=k/E)``: sliding windows of ones."""
    units = depth * num_experts
    filled = int(units * (top_k / num_experts))
    starts = np.round(np.linspace(0, 1, T) ** 4.0 * (units - filled)).astype(np.int64)
    table = torch.zeros(T, units)
    for row, start in enumerate(starts):
        table[row, start : start + filled] = 1.0
    return table


def official_switch_dit_state(
    depth=2, hidden=96, num_experts=3, top_k=2, seed=0, meta=False, **kw
) -> dict[str, torch.Tensor]:
    """DiT tensors plus the DMoE routers (``TaskMoE``: ``f_gate``, ``ParallelExperts`` w [E, D, D], b)."""
    state = official_dit_state(depth=depth, hidden=hidden, seed=seed, meta=meta, **kw)
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape):
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g)

    for n in range(depth):
        # Gate logits of order 1 so that different timesteps pick different experts.
        state[f"routers.{n}.f_gate.1.weight"] = rand(num_experts, hidden) * 3 / hidden**0.5
        state[f"routers.{n}.f_gate.1.bias"] = rand(num_experts) * 0.1
        state[f"routers.{n}.experts.w"] = rand(num_experts, hidden, hidden) * 0.3 / hidden**0.5
        state[f"routers.{n}.experts.b"] = rand(num_experts, hidden) * 0.3
    state["full_time"] = torch.arange(T)
    state["prior._unit_mapping"] = prior_unit_mapping(depth, num_experts, top_k)
    return state


# ----------------------------------------------------------------------------- reference arithmetic


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def _timestep_embedding(sd, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return _linear(F.silu(_linear(emb, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _attention(x, sd, name, heads):
    b, n, d = x.shape
    q, k, v = _linear(x, sd, f"{name}.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return _linear((weights @ v).transpose(1, 2).reshape(b, n, d), sd, f"{name}.proj")


def _mlp(x, sd, name):
    return _linear(F.gelu(_linear(x, sd, f"{name}.fc1"), approximate="tanh"), sd, f"{name}.fc2")


def _norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def reference_forward(sd, x, t, y, heads, top_k=None):
    """The public models' forward from raw tensors; Switch-DiT when ``sd`` has routers."""
    d, _, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    routed = "routers.0.experts.w" in sd
    if routed:
        # DMoE: t_embedder over all timesteps, indexed by t (the gate input is the timestep embedding)
        full_time = _timestep_embedding(sd, torch.arange(T))
        t_emb = full_time[t]
    else:
        t_emb = _timestep_embedding(sd, t)
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    for n in range(depth):
        shift1, scale1, gate1, shift2, scale2, gate2 = _linear(
            F.silu(c), sd, f"blocks.{n}.adaLN_modulation.1"
        ).chunk(6, dim=1)

        def branches(
            r, n=n, shift1=shift1, scale1=scale1, gate1=gate1, shift2=shift2, scale2=scale2, gate2=gate2
        ):
            r = r + gate1[:, None] * _attention(
                _modulate(_norm(r), shift1, scale1), sd, f"blocks.{n}.attn", heads
            )
            return r + gate2[:, None] * _mlp(_modulate(_norm(r), shift2, scale2), sd, f"blocks.{n}.mlp")

        if routed:
            probs = torch.softmax(_linear(F.silu(full_time), sd, f"routers.{n}.f_gate.1"), dim=1)[t]
            gates, index = probs.topk(top_k, dim=1)  # full probabilities, no renormalisation
            w, b = sd[f"routers.{n}.experts.w"], sd[f"routers.{n}.experts.b"]
            out = torch.zeros_like(h)
            for s in range(h.shape[0]):
                for j in range(top_k):
                    e = index[s, j]
                    out[s] += gates[s, j] * (h[s] @ w[e] + b[e])  # ParallelLinear: mm(input, weight[e])
            mask = 1 + out
            h = branches(h * mask) + (1 - mask) * h
        else:
            h = branches(h)
    shift, scale = _linear(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = _linear(_modulate(_norm(h), shift, scale), sd, "final_layer.linear")
    grid = int(h.shape[1] ** 0.5)
    out_ch = h.shape[-1] // (p * p)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(h.shape[0], grid, grid, p, p, out_ch))
    return h.reshape(h.shape[0], out_ch, grid * p, grid * p)


def _inputs(batch=8, in_ch=4, size=8, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_ch, size, size, generator=g)
    t = torch.linspace(0, T - 1, batch).long()  # spread over the schedule: the gates differ
    y = torch.randint(0, num_classes + 1, (batch,), generator=g)  # includes the null class
    return x, t, y


def _model_from(result) -> torch.nn.Module:
    model = build_model(result.config)
    model.load_state_dict(result.state_dict, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- importing


def test_dense_dit_import_matches_reference_arithmetic():
    state = official_dit_state(hidden=64)
    result = import_weights(state, ImportOptions("dit", num_heads=4), source="DiT-test.pt")
    c = result.config
    assert type(c) is DiTConfig
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.input_size) == (2, 64, 4, 2, 8)
    assert (c.num_classes, c.class_dropout_prob, c.learn_sigma, c.in_channels) == (10, 0.1, True, 4)
    assert result.metadata["source_weights"] == "state_dict"
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(_model_from(result)(x, t, y), reference_forward(state, x, t, y, heads=4))


# Parameter counts of the public code (all parameters incl. the fixed pos_embed; 32x32x4, 1000 classes).
PUBLISHED_SIZES = [
    ("dit", "S", 12, 384, 6, 32_963_360),
    ("dit", "B", 12, 768, 12, 130_512_416),
    ("dit", "XL", 28, 1152, 16, 675_129_632),
    ("switch-dit", "S", 12, 384, 6, 38_299_460),
]


@pytest.mark.parametrize("arch,size,depth,hidden,heads,params", PUBLISHED_SIZES)
def test_published_sizes_are_recognised(arch, size, depth, hidden, heads, params):
    """Full-size layouts (shapes only, on the meta device): our layout helpers match the public
    parameter counts, and the import infers the named model's config from the shapes."""
    layout = dict(depth=depth, hidden=hidden, grid=16, num_classes=1000, meta=True)
    state = official_switch_dit_state(**layout) if arch == "switch-dit" else official_dit_state(**layout)
    buffers = ("full_time", "prior._unit_mapping")
    assert sum(v.numel() for k, v in state.items() if k not in buffers) == params
    config = import_weights(state, ImportOptions(arch)).config
    assert config == model_config(arch, size, patch_size=2)


def test_upcycled_switch_dit_equals_the_dense_dit():
    state = official_dit_state(hidden=96)  # a known size: heads inferred
    dense = _model_from(import_weights(state, ImportOptions("dit")))
    x, t, y = _inputs()
    for kind in ("linear", "mlp"):
        result = import_weights(
            state, ImportOptions("dit", upcycle=True, num_experts=4, top_k=2, expert_kind=kind)
        )
        assert isinstance(result.config, SwitchDiTConfig)
        assert (result.config.num_experts, result.config.top_k, result.config.expert_kind) == (4, 2, kind)
        gate = result.state_dict["blocks.1.router.gate.1.weight"]
        assert gate.abs().sum() > 0  # a fresh router, not zeros
        switch = _model_from(result)
        assert isinstance(switch, SwitchDiT)
        with torch.no_grad():
            out, gates = switch(x, t, y, return_gates=True)
            assert torch.equal(out, dense(x, t, y))
        assert gates.shape == (8, 2, 4)
    again = import_weights(
        state, ImportOptions("dit", upcycle=True, num_experts=4, top_k=2, expert_kind="mlp")
    )
    torch.testing.assert_close(again.state_dict, result.state_dict, rtol=0, atol=0)  # seeded
    other = import_weights(
        state, ImportOptions("dit", upcycle=True, num_experts=4, expert_kind="mlp", seed=1)
    )
    assert not torch.equal(other.state_dict["blocks.1.router.gate.1.weight"], gate)


@pytest.mark.parametrize("num_experts,top_k", [(3, 2), (4, 1)])
def test_switch_dit_import_matches_reference_arithmetic(num_experts, top_k):
    state = official_switch_dit_state(num_experts=num_experts, top_k=top_k)
    # Training checkpoint: compiled model and DDP-wrapped EMA keys (torch.compile / DDP prefixes).
    checkpoint = {
        "model": {f"_orig_mod.{k}": v * 0.5 for k, v in state.items()},
        "ema": {f"module._orig_mod.{k}": v for k, v in state.items()},
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }
    result = import_weights(checkpoint, ImportOptions("switch-dit"), source="0400000.pt")
    c = result.config
    assert isinstance(c, SwitchDiTConfig)
    assert (c.num_experts, c.top_k, c.expert_kind, c.hidden_size, c.num_heads) == (
        num_experts,
        top_k,
        "linear",
        96,
        4,
    )
    assert result.metadata["source_weights"] == "ema" and result.metadata["source_num_timesteps"] == str(T)
    model = _model_from(result)
    x, t, y = _inputs()
    with torch.no_grad():
        ours, gates = model(x, t, y, return_gates=True)
        reference = reference_forward(state, x, t, y, heads=4, top_k=top_k)
    torch.testing.assert_close(ours, reference)
    # The test only means something if the samples use different experts and the experts matter.
    chosen = gates.topk(top_k, dim=-1).indices.sort(dim=-1).values  # [batch, depth, k]
    assert len({tuple(sample.flatten().tolist()) for sample in chosen}) > 1
    dense = {k: v for k, v in state.items() if not k.startswith(("routers.", "full_time", "prior."))}
    assert not torch.allclose(reference, reference_forward(dense, x, t, y, heads=4), atol=1e-3)


def test_weights_ema_or_model_from_training_checkpoint(tmp_path):
    ema, trained = official_dit_state(seed=0), official_dit_state(seed=5)
    source = tmp_path / "0050000.pt"
    # DiT's train.py also stores its argparse namespace: loaded as an inert record, never executed.
    args = argparse.Namespace(model="DiT-S/2", image_size=64, global_seed=0)
    torch.save({"model": trained, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}, source)
    for flag, expected in ((None, ema), ("ema", ema), ("model", trained)):
        out = tmp_path / f"{flag}.safetensors"
        argv = ["import", "--format", "dit", str(source), str(out), "--num-heads", "4"]
        assert cli_main(argv + (["--weights", flag] if flag else [])) == 0
        model = load_model(out)
        for key, value in expected.items():
            assert torch.equal(model.state_dict()[key], value), key
        _, metadata = read_model_metadata(out)
        assert metadata["source_weights"] == (flag or "ema")
    loaded = safe_load(source)
    assert isinstance(loaded["args"], InertRecord) and loaded["args"].source_name == "argparse.Namespace"


def test_top_k_from_the_stored_prior_and_conflicts():
    state = official_switch_dit_state(num_experts=3, top_k=1)
    assert import_weights(state, ImportOptions("switch-dit")).config.top_k == 1
    with pytest.raises(UserError, match=r"--top-k 2 disagrees with 'prior._unit_mapping' \(top-k 1\)"):
        import_weights(state, ImportOptions("switch-dit", top_k=2))
    with pytest.raises(UserError, match="--num-experts 4 disagrees"):
        import_weights(state, ImportOptions("switch-dit", num_experts=4))
    without_prior = {k: v for k, v in state.items() if k != "prior._unit_mapping"}
    assert import_weights(without_prior, ImportOptions("switch-dit")).config.top_k == 2  # paper default
    assert import_weights(without_prior, ImportOptions("switch-dit", top_k=3)).config.top_k == 3


def test_classes_and_input_size_options():
    single = official_dit_state(hidden=96, num_classes=1, null_class=False)  # Switch-DiT's FFHQ setting
    config = import_weights(single, ImportOptions("dit")).config
    assert (config.num_classes, config.class_dropout_prob) == (1, 0.0)
    config = import_weights(official_dit_state(hidden=96), ImportOptions("dit", num_classes=11)).config
    assert (config.num_classes, config.class_dropout_prob) == (11, 0.0)
    with pytest.raises(UserError, match="--num-classes 5 does not fit .* 11 rows"):
        import_weights(official_dit_state(hidden=96), ImportOptions("dit", num_classes=5))

    state = official_dit_state(hidden=96)
    state["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(96, 4)).float()[None]
    result = import_weights(state, ImportOptions("dit", input_size=16))
    assert result.config.input_size == 16
    torch.testing.assert_close(
        result.state_dict["pos_embed"][0], torch.from_numpy(sincos_pos_embed_2d(96, 8)).float()
    )
    with torch.no_grad():
        assert _model_from(result)(
            torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 1])
        ).shape == (
            2,
            8,
            16,
            16,
        )
    with pytest.raises(UserError, match="not the fixed sin-cos table"):
        import_weights(official_dit_state(hidden=96), ImportOptions("dit", input_size=16))


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases() -> dict[str, tuple[object, list[str], str]]:
    dit = official_dit_state(hidden=96)
    switch = official_switch_dit_state()
    missing = {k: v for k, v in dit.items() if k != "blocks.1.attn.proj.bias"}
    wrong_mlp = {**dit, "blocks.0.mlp.fc2.weight": torch.zeros(96, 100)}
    wrong_expert = {**switch, "routers.1.experts.w": torch.zeros(3, 96, 64)}
    missing_router = {k: v for k, v in switch.items() if k != "routers.1.f_gate.1.bias"}
    return {
        "unknown layout": (
            {"state_dict": {"w": torch.zeros(2)}, "step": 3},
            ["dit"],
            "not a DiT/Switch-DiT checkpoint",
        ),
        "not a dict": ([torch.zeros(2)], ["dit"], "not a checkpoint"),
        "switch as dit": (switch, ["dit"], "use --format switch-dit"),
        "dit as switch": (dit, ["switch-dit"], "for a dense DiT use --format dit"),
        "missing key": (missing, ["dit"], "missing: blocks.1.attn.proj.bias"),
        "wrong shape": (wrong_mlp, ["dit"], r"wrong shape: blocks.0.mlp.fc2.weight \(96, 100\)"),
        "wrong expert shape": (
            wrong_expert,
            ["switch-dit"],
            r"'routers.1.experts.w' has shape \(3, 96, 64\)",
        ),
        "missing router key": (missing_router, ["switch-dit"], r"missing \['routers.1.f_gate.1.bias'\]"),
        "model from bare": (dit, ["dit", "--weights", "model"], "holds one bare state dict"),
        "no ema entry": ({"model": dit}, ["dit"], r"no 'ema' entry; top-level entries: \['model'\]"),
        "unknown size": (official_dit_state(hidden=64), ["dit"], "pass --num-heads"),
        "upcycle switch": (switch, ["switch-dit", "--upcycle"], "needs --format dit"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_checkpoints_give_clear_errors_and_write_nothing(case, tmp_path, capsys):
    checkpoint, args, message = _bad_cases()[case]
    source, out = tmp_path / "in.pt", tmp_path / "out.safetensors"
    torch.save(checkpoint, source)
    assert cli_main(["import", "--format", *args[:1], str(source), str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchdit import: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_not_a_checkpoint_and_missing_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n" * 10)
    out = tmp_path / "out.safetensors"
    assert cli_main(["import", "--format", "dit", str(text), str(out)]) == 2
    assert "not a PyTorch checkpoint or safetensors file" in capsys.readouterr().err
    assert cli_main(["import", "--format", "dit", str(tmp_path / "absent.pt"), str(out)]) == 2
    assert "absent.pt: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_safetensors_input_and_own_model_file(tmp_path, capsys):
    source = tmp_path / "DiT-tiny.safetensors"
    save_file(official_dit_state(hidden=96), str(source))
    out = tmp_path / "model.safetensors"
    assert cli_main(["import", "--format", "dit", str(source), str(out)]) == 0
    assert "imported dit (state_dict weights): depth 2, hidden 96" in capsys.readouterr().out
    assert cli_main(["import", "--format", "dit", str(out), str(tmp_path / "again.safetensors")]) == 2
    assert "already a switchdit model file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- safe loading


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_that_run_code_are_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"ema": _RunsCode(marker)}))
    raw2 = tmp_path / "raw-protocol2.pkl"  # an opcode set the restricted unpickler reads up to the call
    raw2.write_bytes(pickle.dumps({"ema": _RunsCode(marker)}, protocol=2))
    zipped = tmp_path / "zipped.pt"
    torch.save({"ema": official_dit_state(), "hook": _RunsCode(marker)}, zipped)
    for path in (raw, raw2, zipped):
        with pytest.raises(UserError, match="refused to load") as info:
            safe_load(path)
        assert "safetensors" in str(info.value) and "weights_only=False" in str(info.value)
        out = tmp_path / "out.safetensors"
        assert cli_main(["import", "--format", "dit", str(path), str(out)]) == 2
        assert "refused to load" in capsys.readouterr().err
        assert not out.exists()
    for path in (raw2, zipped):
        assert "system" in str(pytest.raises(UserError, safe_load, path).value)
    assert not marker.exists()
    # Sanity check that the payload is real: unrestricted unpickling does run it.
    pickle.loads(raw.read_bytes())
    assert marker.exists()


def test_omegaconf_config_is_loaded_inert(tmp_path, monkeypatch):
    """The Switch-DiT code saves its hydra/OmegaConf config in the checkpoint. A stand-in module with
    the same class path proves the real class is never used: its __setstate__ would write a marker."""
    marker = tmp_path / "setstate-ran"

    class DictConfig:
        def __init__(self, content):
            self._content = content

        def __getstate__(self):
            return {"_content": self._content}

        def __setstate__(self, state):
            marker.write_text("ran")

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    fake = types.ModuleType("omegaconf.dictconfig")
    fake.DictConfig = DictConfig
    path = tmp_path / "0400000.pt"
    state = official_switch_dit_state()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
        patch.setitem(sys.modules, "omegaconf.dictconfig", fake)
        torch.save({"model": state, "ema": state, "opt": {}, "config": DictConfig({"k": 2})}, path)
    assert "omegaconf.dictconfig" not in sys.modules
    loaded = safe_load(path)
    assert loaded["config"].source_name == "omegaconf.dictconfig.DictConfig"
    assert loaded["config"].state == {"_content": {"k": 2}}
    assert not marker.exists()
    assert import_weights(loaded, ImportOptions("switch-dit")).config.num_experts == 3


# ----------------------------------------------------------------------------- the one-file format


@pytest.mark.parametrize("arch", ["dit", "switch-dit"])
def test_model_file_round_trip(arch, tmp_path):
    cls = SwitchDiTConfig if arch == "switch-dit" else DiTConfig
    config = cls(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero experts and adaLN
    path = tmp_path / "model.safetensors"
    save_model_file(path, model.state_dict(), config, {"step": 1234, "note": "demo"})
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == config and not loaded.training
    assert not loaded.pos_embed.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))
    _, metadata = read_model_metadata(path)
    assert (
        metadata["step"] == "1234"
        and metadata["note"] == "demo"
        and metadata["switchdit_format_version"] == "1"
    )
    half = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="without 'switchdit_config' metadata"):
        load_model(plain)
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_model(pt)

    config = DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    state = build_model(config).state_dict()
    wrong = tmp_path / "wrong.safetensors"
    save_model_file(
        wrong, state, DiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    )
    with pytest.raises(UserError, match="do not match the model config; missing: blocks.2"):
        load_model(wrong)
    save_model_file(
        wrong, state, SwitchDiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    )
    with pytest.raises(UserError, match=r"missing: blocks.0.router.gate.1.weight"):
        load_model(wrong)
    save_model_file(
        wrong, state, DiTConfig(input_size=16, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    )
    with pytest.raises(
        UserError, match=r"wrong shape: pos_embed \(1, 16, 64\) \(config expects \(1, 64, 64\)\)"
    ):
        load_model(wrong)
    bad_arch = tmp_path / "bad_arch.safetensors"
    save_file(
        dict(state),
        str(bad_arch),
        metadata={"switchdit_config": '{"arch": "unet"}', "switchdit_format_version": "1"},
    )
    with pytest.raises(UserError, match="'arch' must be one of"):
        load_model(bad_arch)
