"""Optional dependencies: what only one command needs is an extra of the package, not part of
the training install (``pip install 'switchdit-dist[digits]'`` for the digits demo data,
``[vae]`` for encoding images with a VAE). A command that needs one imports it through ``need``,
which names the extra to install instead of failing with an ``ImportError``."""

from __future__ import annotations

import importlib
from types import ModuleType

from switchdit_dist.errors import UserError

EXTRAS = {"sklearn": ("scikit-learn", "digits"), "diffusers": ("diffusers", "vae")}


def need(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or one UserError saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        package, extra = EXTRAS.get(top, (top, None))
        hint = f"pip install 'switchdit-dist[{extra}]'" if extra else f"pip install {package}"
        raise UserError(f"{purpose} needs {package}, which is not installed: {hint}") from None
