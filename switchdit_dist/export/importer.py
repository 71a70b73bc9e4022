"""``switchdit import``: public DiT and Switch-DiT weights -> one model file.

Two source layouts are understood.

**facebookresearch/DiT** (``models.py``): the released EMA files (``DiT-XL-2-256x256.pt``) are
bare state dicts; ``train.py`` checkpoints hold ``model``, ``ema``, ``opt`` and ``args``. Our DiT
uses the same module names, so the tensors are copied unchanged.

**byeongjun-park/Switch-DiT** (``models/DiT/models.py``, ``models/MoE.py``), training checkpoints
with ``model``, ``ema``, ``opt`` and ``config``. The backbone keys are DiT's; the experts live in
top-level routers, one per block:

- ``routers.N.f_gate`` = ``Sequential(SiLU, Linear(D, E))``, applied to the timestep embedding
  (``t_embedder`` of all timesteps, indexed by t) -> ``blocks.N.router.gate``, unchanged;
- ``routers.N.experts.w`` [E, D_in, D_out] and ``experts.b`` [E, D_out]: expert j computes
  ``x @ w[j] + b[j]``, while ``nn.Linear`` computes ``x @ W.T + b``; so
  ``blocks.N.moe.experts.j.weight = w[j].T`` and ``.bias = b[j]``;
- the gate weights are the full softmax probabilities of the top-k (not renormalised), the mask
  is ``1 + sum_j p_j (x w_j + b_j)`` and the block applies it as ours does, so nothing else changes;
- buffers ``full_time`` (arange of T) and ``prior._unit_mapping`` (the [T, N*E] prior, whose rows
  hold N*k ones) are dropped; the latter gives top-k.

Model sizes come from the tensor shapes; the head count (not visible in shapes) from the known
sizes, or ``--num-heads``. ``--upcycle`` turns a dense DiT into a Switch-DiT whose experts start at
zero (the output is unchanged) and whose routers are freshly initialised from ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from switchdit_dist.errors import UserError
from switchdit_dist.export.load import check_state_dict, save_model_file
from switchdit_dist.export.safe_load import is_safetensors_file, safe_load
from switchdit_dist.models.dit import DiTConfig, sincos_pos_embed_2d
from switchdit_dist.models.experts import EXPERT_KINDS, LocalExperts
from switchdit_dist.models.registry import SIZES, arch_of, build_model, is_moe
from switchdit_dist.models.switch_dit import SwitchDiTConfig, TimestepRouter

SOURCE_FORMATS = ("dit", "switch-dit")
WEIGHT_CHOICES = ("ema", "model")
# Added by DistributedDataParallel and torch.compile; a key may carry both.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# hidden size -> heads, from the named sizes (the head count does not show in any tensor shape).
KNOWN_HEADS = {hidden: heads for _, hidden, heads in SIZES.values()}
# Switch-DiT buffers that our model recomputes instead of storing.
SWITCH_DIT_BUFFERS = ("full_time", "prior._unit_mapping")
PAPER_NUM_EXPERTS, PAPER_TOP_K = 3, 2

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_ROUTER_KEY = re.compile(r"^routers\.(\d+)\.(.+)$")


@dataclass
class ImportOptions:
    source_format: str
    weights: str = "ema"
    upcycle: bool = False
    num_experts: int | None = None
    top_k: int | None = None
    input_size: int | None = None
    num_classes: int | None = None
    num_heads: int | None = None
    expert_kind: str = "linear"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source_format not in SOURCE_FORMATS:
            raise UserError(f"--format must be one of {SOURCE_FORMATS}, got {self.source_format!r}")
        if self.weights not in WEIGHT_CHOICES:
            raise UserError(f"--weights must be one of {WEIGHT_CHOICES}, got {self.weights!r}")
        if self.expert_kind not in EXPERT_KINDS:
            raise UserError(f"--expert-kind must be one of {EXPERT_KINDS}, got {self.expert_kind!r}")
        if self.upcycle and self.source_format != "dit":
            raise UserError("--upcycle turns a dense DiT into a Switch-DiT; it needs --format dit")
        for name in ("num_experts", "top_k", "input_size", "num_classes", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        dense_only = self.source_format == "dit" and not self.upcycle
        if dense_only and (self.num_experts is not None or self.top_k is not None):
            raise UserError(
                "--num-experts and --top-k apply to Switch-DiT: add --upcycle or use --format switch-dit"
            )
        if self.expert_kind != "linear" and not self.upcycle:
            raise UserError(
                "--expert-kind applies only with --upcycle (the Switch-DiT code's experts are linear)"
            )
        experts, top_k = self.num_experts or PAPER_NUM_EXPERTS, self.top_k or PAPER_TOP_K
        if self.upcycle and top_k > experts:
            raise UserError(f"--top-k {top_k} exceeds --num-experts {experts}")


@dataclass
class ImportResult:
    state_dict: dict[str, torch.Tensor]
    config: DiTConfig
    metadata: dict[str, str]


# ----------------------------------------------------------------------------- picking the weights


def select_weights(checkpoint: Any, weights: str, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to import and where it came from (``"state_dict"``, ``"ema"`` or ``"model"``)."""
    expected = "a state dict of tensors, or a training checkpoint with 'model' and 'ema' state dicts"
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise UserError(f"{source}: not a checkpoint: expected {expected}, got {_describe(checkpoint)}")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if weights == "model":
            raise UserError(
                f"{source}: holds one bare state dict (the released DiT files hold EMA weights); "
                "--weights model needs a training checkpoint with 'model' and 'ema' entries"
            )
        return dict(checkpoint), "state_dict"
    if "ema" in checkpoint or "model" in checkpoint:
        if weights not in checkpoint:
            raise UserError(
                f"{source}: no '{weights}' entry; top-level entries: {sorted(map(str, checkpoint))}"
            )
        chosen = checkpoint[weights]
        if (
            not isinstance(chosen, Mapping)
            or not chosen
            or not all(isinstance(v, torch.Tensor) for v in chosen.values())
        ):
            raise UserError(f"{source}: '{weights}' is not a state dict of tensors ({_describe(chosen)})")
        return dict(chosen), weights
    shown = sorted(map(str, checkpoint))[:10]
    raise UserError(
        f"{source}: not a DiT/Switch-DiT checkpoint: expected {expected}; top-level entries: {shown}"
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a dict with {len(obj)} entries of type(s) {kinds}"
    return f"a {type(obj).__name__}"


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise UserError(
                f"{source}: '{key}' and another key both become '{name}' without wrapper prefixes"
            )
        out[name] = value
    return out


# ----------------------------------------------------------------------------- sizes from shapes


def _require(state: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{source}: missing '{key}' (expected the facebookresearch/DiT key layout)")
    tensor = state[key]
    if tensor.ndim != ndim:
        raise UserError(f"{source}: '{key}' has shape {tuple(tensor.shape)}; expected {ndim} dimensions")
    return tensor


def infer_dit_config(state: Mapping[str, torch.Tensor], options: ImportOptions, source: str) -> DiTConfig:
    """The DiT backbone's config from tensor shapes (and the options for what shapes cannot tell)."""
    proj = _require(state, "x_embedder.proj.weight", 4, source)
    hidden, in_channels, patch, patch_w = proj.shape
    if patch != patch_w:
        raise UserError(f"{source}: 'x_embedder.proj.weight' has non-square patches {tuple(proj.shape)}")

    depths = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if not depths or depths != list(range(len(depths))):
        raise UserError(f"{source}: block indices must run 0..N-1, found {depths[:10]}")

    pos = _require(state, "pos_embed", 3, source)
    grid = int(round(pos.shape[1] ** 0.5))
    if pos.shape[0] != 1 or pos.shape[2] != hidden or grid * grid != pos.shape[1]:
        raise UserError(f"{source}: 'pos_embed' {tuple(pos.shape)} is not [1, grid*grid, {hidden}]")
    input_size = grid * patch
    if options.input_size is not None:
        if options.input_size % patch:
            raise UserError(f"--input-size {options.input_size} is not a multiple of the patch size {patch}")
        input_size = options.input_size

    fc1 = _require(state, "blocks.0.mlp.fc1.weight", 2, source)
    mlp_ratio = fc1.shape[0] / hidden
    if int(hidden * mlp_ratio) != fc1.shape[0]:
        raise UserError(
            f"{source}: MLP width {fc1.shape[0]} is not expressible as a ratio of hidden {hidden}"
        )

    final = _require(state, "final_layer.linear.weight", 2, source)
    out_channels, rest = divmod(final.shape[0], patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise UserError(
            f"{source}: 'final_layer.linear.weight' has {final.shape[0]} outputs; expected patch^2 x "
            f"{in_channels} or x {2 * in_channels} channels (patch {patch})"
        )

    num_heads = options.num_heads if options.num_heads is not None else KNOWN_HEADS.get(hidden)
    if num_heads is None:
        raise UserError(
            f"{source}: hidden size {hidden} is not one of the known sizes {sorted(KNOWN_HEADS)}; "
            "the head count is not visible in the weights, pass --num-heads"
        )
    if hidden % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the hidden size {hidden}")

    num_classes, class_dropout_prob = _classes(state, options, source)
    return DiTConfig(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=len(depths),
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        class_dropout_prob=class_dropout_prob,
        num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
    )


def _classes(state: Mapping[str, torch.Tensor], options: ImportOptions, source: str) -> tuple[int, float]:
    """(num_classes, class_dropout_prob): the table has one extra row, the null class, when CFG
    dropout was on (DiT's default 0.1); Switch-DiT drops it for a single class (FFHQ)."""
    rows = _require(state, "y_embedder.embedding_table.weight", 2, source).shape[0]
    wanted = options.num_classes
    if wanted is None:
        return (1, 0.0) if rows == 1 else (rows - 1, 0.1)
    if rows == wanted + 1:
        return wanted, 0.1
    if rows == wanted:
        return wanted, 0.0
    raise UserError(
        f"--num-classes {wanted} does not fit 'y_embedder.embedding_table.weight' with {rows} rows "
        f"(expected {wanted} or {wanted + 1} with the null class)"
    )


def _resize_pos_embed(state: dict[str, torch.Tensor], config: DiTConfig, source: str) -> None:
    """Replace the fixed sin-cos table for another input size, after checking it is that table."""
    stored = state["pos_embed"]
    grid = int(round(stored.shape[1] ** 0.5))
    if grid * grid * config.patch_size**2 == config.input_size**2:
        return
    reference = torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, grid)).float()[None]
    if not torch.allclose(stored.float(), reference, atol=1e-4):
        raise UserError(
            f"{source}: 'pos_embed' is not the fixed sin-cos table, so it cannot be regenerated for "
            f"--input-size {config.input_size}"
        )
    new_grid = config.input_size // config.patch_size
    state["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, new_grid))[None].to(
        stored.dtype
    )


# ----------------------------------------------------------------------------- Switch-DiT routers


def map_switch_dit_routers(
    state: Mapping[str, torch.Tensor], dit_config: DiTConfig, options: ImportOptions, source: str
) -> tuple[dict[str, torch.Tensor], SwitchDiTConfig, dict[str, str]]:
    """Official ``routers.N.*`` -> our ``blocks.N.router`` / ``blocks.N.moe``; returns the new state,
    the config and metadata about the dropped buffers. Unknown keys pass through unchanged so the
    final check reports them."""
    depth = dit_config.depth
    routers: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in SWITCH_DIT_BUFFERS:
            continue
        match = _ROUTER_KEY.match(key)
        if match:
            routers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            out[key] = value
    if sorted(routers) != list(range(depth)):
        raise UserError(
            f"{source}: expected routers 0..{depth - 1} (one per block), found {sorted(routers)[:10]}"
        )

    w0 = routers[0].get("experts.w")
    if w0 is None or w0.ndim != 3:
        found = sorted(routers[0])
        raise UserError(
            f"{source}: 'routers.0.experts.w' missing or not [E, D, D] (router 0 has {found}); expected the "
            "Switch-DiT (DMoE routing) layout"
        )
    num_experts = w0.shape[0]
    if options.num_experts is not None and options.num_experts != num_experts:
        raise UserError(
            f"--num-experts {options.num_experts} disagrees with 'routers.0.experts.w' "
            f"({num_experts} experts)"
        )
    top_k = _top_k(state, depth, num_experts, options, source)

    hidden = dit_config.hidden_size
    expected = {
        "experts.w": (num_experts, hidden, hidden),
        "experts.b": (num_experts, hidden),
        "f_gate.1.weight": (num_experts, hidden),
        "f_gate.1.bias": (num_experts,),
    }
    for n in range(depth):
        params = routers[n]
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise UserError(
                f"{source}: router {n}: missing {[f'routers.{n}.{k}' for k in missing]}, unexpected {extra}"
            )
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise UserError(
                    f"{source}: 'routers.{n}.{name}' has shape {tuple(params[name].shape)}; expected {shape} "
                    f"(hidden {hidden}, {num_experts} experts)"
                )
        out[f"blocks.{n}.router.gate.1.weight"] = params["f_gate.1.weight"]
        out[f"blocks.{n}.router.gate.1.bias"] = params["f_gate.1.bias"]
        for j in range(num_experts):
            # official: x @ w[j] + b[j]; nn.Linear: x @ weight.T + bias
            out[f"blocks.{n}.moe.experts.{j}.weight"] = params["experts.w"][j].t().contiguous()
            out[f"blocks.{n}.moe.experts.{j}.bias"] = params["experts.b"][j].clone()

    config = SwitchDiTConfig(**dataclasses.asdict(dit_config), num_experts=num_experts, top_k=top_k)
    metadata = {}
    if "full_time" in state:
        metadata["source_num_timesteps"] = str(state["full_time"].numel())
    return out, config, metadata


def _top_k(
    state: Mapping[str, torch.Tensor], depth: int, num_experts: int, options: ImportOptions, source: str
) -> int:
    """From the stored prior (each row holds depth*k ones) when present, else the option or the paper's 2."""
    prior = state.get("prior._unit_mapping")
    if prior is None:
        top_k = options.top_k if options.top_k is not None else PAPER_TOP_K
    else:
        ones = prior.float().sum(dim=-1) if prior.ndim == 2 else None
        if ones is None or prior.shape[1] != depth * num_experts or not bool((ones == ones[0]).all()):
            raise UserError(
                f"{source}: 'prior._unit_mapping' {tuple(prior.shape)} is not a [T, {depth * num_experts}] "
                "table with the same number of ones in every row"
            )
        count = int(ones[0])
        if count % depth:
            raise UserError(
                f"{source}: 'prior._unit_mapping' rows hold {count} ones, not a multiple of depth {depth}"
            )
        top_k = count // depth
        if options.top_k is not None and options.top_k != top_k:
            raise UserError(f"--top-k {options.top_k} disagrees with 'prior._unit_mapping' (top-k {top_k})")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"top-k must be in [1, {num_experts}], got {top_k}")
    return top_k


# ----------------------------------------------------------------------------- upcycling


def upcycle(
    state: Mapping[str, torch.Tensor],
    config: DiTConfig,
    num_experts: int = PAPER_NUM_EXPERTS,
    top_k: int = PAPER_TOP_K,
    expert_kind: str = "linear",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], SwitchDiTConfig]:
    """A dense DiT's weights plus, per block, a fresh router and zero-output experts.

    The experts' output is zero, so the mask is 1 and the Switch-DiT computes exactly the DiT.
    Routers are initialised like the model's own (xavier weight, zero bias) from ``seed``.
    """
    sw_config = SwitchDiTConfig(
        **dataclasses.asdict(config), num_experts=num_experts, top_k=top_k, expert_kind=expert_kind
    )
    dtype = state["x_embedder.proj.weight"].dtype
    out = dict(state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n in range(config.depth):
            router = TimestepRouter(config.hidden_size, num_experts, top_k)
            nn.init.xavier_uniform_(router.gate[1].weight)
            nn.init.zeros_(router.gate[1].bias)
            experts = LocalExperts(config.hidden_size, num_experts, expert_kind, sw_config.expert_mlp_ratio)
            for prefix, module in ((f"blocks.{n}.router.", router), (f"blocks.{n}.moe.", experts)):
                for key, value in module.state_dict().items():
                    out[prefix + key] = value.to(dtype)
    return out, sw_config


# ----------------------------------------------------------------------------- the whole import


def import_weights(checkpoint: Any, options: ImportOptions, source: str = "checkpoint") -> ImportResult:
    """In-memory import: a loaded checkpoint object -> our state dict, config and file metadata."""
    state, origin = select_weights(checkpoint, options.weights, source)
    state = strip_wrapper_prefixes(state, source)
    has_routers = any(k.startswith("routers.") for k in state)
    if options.source_format == "dit" and has_routers:
        raise UserError(
            f"{source}: has 'routers.*' keys, so it is a Switch-DiT checkpoint; use --format switch-dit"
        )
    if options.source_format == "switch-dit" and not has_routers:
        raise UserError(
            f"{source}: no 'routers.*' keys, so it is not a Switch-DiT checkpoint; for a dense DiT use "
            "--format dit (add --upcycle to turn it into a Switch-DiT)"
        )

    dit_config = infer_dit_config(state, options, source)
    metadata = {
        "source_file": Path(source).name,
        "source_format": options.source_format,
        "source_weights": origin,
    }
    if options.source_format == "switch-dit":
        state, config, extra = map_switch_dit_routers(state, dit_config, options, source)
        metadata.update(extra)
    else:
        config = dit_config
    _check(state, config, source)
    _resize_pos_embed(state, config, source)

    if options.upcycle:
        state, config = upcycle(
            state,
            config,
            num_experts=options.num_experts or PAPER_NUM_EXPERTS,
            top_k=options.top_k or PAPER_TOP_K,
            expert_kind=options.expert_kind,
            seed=options.seed,
        )
        metadata.update(upcycled_from="dit", upcycle_seed=str(options.seed))
        _check(state, config, source)
    return ImportResult(state_dict=state, config=config, metadata=metadata)


def _check(state: dict[str, torch.Tensor], config: DiTConfig, source: str) -> None:
    """Compare against the model the config describes (built on the meta device: no memory, no init).

    The input size is left as stored here; ``_resize_pos_embed`` handles a requested change.
    """
    grid = int(round(state["pos_embed"].shape[1] ** 0.5)) if "pos_embed" in state else None
    stored_size = dataclasses.replace(config, input_size=grid * config.patch_size) if grid else config
    try:
        with torch.device("meta"):
            model = build_model(stored_size)
    except ValueError as err:
        raise UserError(f"{source}: inferred an invalid model config: {err}") from None
    check_state_dict(model, state, source)
    # Keep the model's key order in the file.
    order = list(model.state_dict())
    reordered = {k: state[k] for k in order}
    state.clear()
    state.update(reordered)


def import_file(in_path: str | Path, out_path: str | Path, options: ImportOptions) -> ImportResult:
    """Read ``in_path`` safely, import it and write the one-file model to ``out_path``.

    Nothing is written unless the whole import succeeds.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise UserError(f"{out_path}: the output would overwrite the input")
    if not out_path.parent.is_dir():
        raise UserError(f"{out_path}: directory {out_path.parent} does not exist")
    if in_path.is_file() and is_safetensors_file(in_path) and _is_model_file(in_path):
        raise UserError(f"{in_path}: already a switchdit model file; load it with switchdit_dist.load_model")
    checkpoint = safe_load(in_path)
    result = import_weights(checkpoint, options, source=str(in_path))
    save_model_file(out_path, result.state_dict, result.config, result.metadata)
    return result


def _is_model_file(path: Path) -> bool:
    from safetensors import safe_open

    from switchdit_dist.export.load import CONFIG_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except Exception:
        return False


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        dest="source_format",
        required=True,
        choices=SOURCE_FORMATS,
        help="layout of IN: facebookresearch/DiT or byeongjun-park/Switch-DiT",
    )
    parser.add_argument("input", metavar="IN", help="checkpoint (.pt/.pth) or safetensors state dict")
    parser.add_argument("output", metavar="OUT", help="model file to write (.safetensors)")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default="ema",
        help="which weights of a training checkpoint (default: ema)",
    )
    parser.add_argument(
        "--upcycle",
        action="store_true",
        help="turn a dense DiT into a Switch-DiT with zero-initialised experts",
    )
    parser.add_argument(
        "--num-experts", type=int, help=f"experts per block when upcycling (default {PAPER_NUM_EXPERTS})"
    )
    parser.add_argument(
        "--top-k", type=int, help=f"experts per sample (default: from the checkpoint, else {PAPER_TOP_K})"
    )
    parser.add_argument(
        "--expert-kind", choices=EXPERT_KINDS, default="linear", help="expert type when upcycling"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh routers when upcycling")
    parser.add_argument("--input-size", type=int, help="latent size (default: from pos_embed)")
    parser.add_argument(
        "--num-classes", type=int, help="classes without the null class (default: from the table)"
    )
    parser.add_argument(
        "--num-heads", type=int, help="attention heads, needed when the hidden size is not a known size"
    )


def run(args: argparse.Namespace) -> int:
    options = ImportOptions(
        source_format=args.source_format,
        weights=args.weights,
        upcycle=args.upcycle,
        num_experts=args.num_experts,
        top_k=args.top_k,
        input_size=args.input_size,
        num_classes=args.num_classes,
        num_heads=args.num_heads,
        expert_kind=args.expert_kind,
        seed=args.seed,
    )
    result = import_file(args.input, args.output, options)
    c = result.config
    params = sum(t.numel() for t in result.state_dict.values())
    experts = f", {c.num_experts} experts top-{c.top_k}" if is_moe(c) else ""
    print(
        f"imported {arch_of(c)} ({result.metadata['source_weights']} weights): depth {c.depth}, hidden "
        f"{c.hidden_size}, heads {c.num_heads}, patch {c.patch_size}, input {c.input_size}, "
        f"classes {c.num_classes}{experts}; {params:,} values -> {args.output}"
    )
    return 0
