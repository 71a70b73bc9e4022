"""Named model sizes: ``DiT-S/2``, ``Switch-DiT-XL/2``, ... plus ``tiny`` for tests and the demo."""

from __future__ import annotations

from dataclasses import fields, replace

from switchdit_dist.models.dit import DiT, DiTConfig
from switchdit_dist.models.switch_dit import ExpertsFactory, SwitchDiT, SwitchDiTConfig, local_experts_factory

# size -> (depth, hidden_size, num_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 96, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
# The architectures by their config and file name; Switch-DiT is the mixture-of-experts one.
ARCH_CONFIGS: dict[str, type[DiTConfig]] = {"dit": DiTConfig, "switch-dit": SwitchDiTConfig}
ARCHS = tuple(ARCH_CONFIGS)
NAMES = {"dit": "DiT", "switch-dit": "Switch-DiT"}


def is_moe(config: DiTConfig) -> bool:
    """Whether a model has mixture-of-experts blocks (the one test of it; arch names go through
    ``is_moe_arch``)."""
    return isinstance(config, SwitchDiTConfig)


def is_moe_arch(arch: str) -> bool:
    return issubclass(ARCH_CONFIGS[arch], SwitchDiTConfig)


def arch_of(config: DiTConfig) -> str:
    return "switch-dit" if is_moe(config) else "dit"


def model_config(arch: str, size: str, patch_size: int = 2, **overrides) -> DiTConfig:
    """The config of a named model; ``overrides`` set any other field (input_size, num_experts, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    depth, hidden, heads = SIZES[size]
    cls = ARCH_CONFIGS[arch]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return replace(cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch_size), **overrides)


def parse_name(name: str) -> tuple[str, str, int]:
    """``'Switch-DiT-S/2'`` -> ``('switch-dit', 'S', 2)``."""
    try:
        prefix, patch = name.rsplit("/", 1)
        arch_part, size = prefix.rsplit("-", 1)
        arch = {display.lower(): a for a, display in NAMES.items()}[arch_part.lower()]
        if size not in SIZES:
            raise KeyError(size)
        return arch, size, int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"model name must look like 'DiT-S/2' or 'Switch-DiT-XL/2', got {name!r}") from None


def build_model(config: DiTConfig, experts_factory: ExpertsFactory = local_experts_factory) -> DiT:
    if is_moe(config):
        return SwitchDiT(config, experts_factory)
    return DiT(config)
