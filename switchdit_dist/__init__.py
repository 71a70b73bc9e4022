"""switchdit-dist: distributed training of Switch-DiT."""

__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None):
    """Load a model from a one-file safetensors export (see ``switchdit convert``)."""
    from switchdit_dist.export.load import load_model as _load

    return _load(path, device=device, dtype=dtype)
