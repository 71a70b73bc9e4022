"""A small CNN classifying the 16x16 digits, trained on first use and cached.

Its penultimate layer (``features``) provides the feature space of the digits Fréchet distance,
the way the Inception network's pool layer does for FID. Training takes seconds on one CPU core;
the weights go to ``$SWITCHDIT_CACHE/digits_classifier.safetensors`` (default cache directory
``~/.cache/switchdit``) so later evaluations load them instead.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from switchdit_dist.errors import UserError
from switchdit_dist.eval.digits_data import NUM_DIGIT_CLASSES, SPLIT_SEED, digits_split

CACHE_ENV = "SWITCHDIT_CACHE"
CLASSIFIER_FILE = "digits_classifier.safetensors"
# Bump when the architecture, preprocessing, split or recipe changes: stale caches are retrained.
FORMAT_VERSION = "1"
FEATURE_DIM = 64


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "switchdit")


class DigitsClassifier(nn.Module):
    """[N, 1, 16, 16] in [-1, 1] -> logits [N, 10]; ``features`` gives the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_DIGIT_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TrainRecipe:
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 1  # random translation in pixels: tolerance to slightly off-centre samples


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def train_classifier(recipe: TrainRecipe | None = None) -> tuple[DigitsClassifier, float]:
    """Train on the fixed train split; returns the model (eval mode) and its held-out accuracy."""
    recipe = recipe or TrainRecipe()
    (train_x, train_y), (heldout_x, heldout_y) = digits_split()
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    steps_per_epoch = -(-len(train_x) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    for _ in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            x = _random_shift(train_x[batch], recipe.max_shift, generator)
            loss = F.cross_entropy(model(x), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), accuracy(model, heldout_x, heldout_y)


def _load_cached(path: Path) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is from another format version."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format_version") != FORMAT_VERSION or metadata.get("split_seed") != str(
                SPLIT_SEED
            ):
                return None
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # a truncated or foreign file: say which one, and how to recover
        raise UserError(
            f"cannot read the cached digits classifier {path} ({err}); delete it to retrain"
        ) from None
    model = DigitsClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(
            f"cached digits classifier {path} does not match the network ({err}); delete it"
        ) from None
    return model.eval()


def _save_atomically(model: DigitsClassifier, heldout_accuracy: float, path: Path) -> None:
    """Write to a temporary file and rename, so concurrent evaluations never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format_version": FORMAT_VERSION,
        "split_seed": str(SPLIT_SEED),
        "heldout_accuracy": f"{heldout_accuracy:.6f}",
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache directory may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_or_train_classifier(directory: Path | None = None) -> DigitsClassifier:
    """The cached classifier from ``directory`` (default :func:`cache_dir`), training it if absent."""
    path = Path(directory or cache_dir()) / CLASSIFIER_FILE
    if path.exists():
        model = _load_cached(path)
        if model is not None:
            return model
    model, heldout_accuracy = train_classifier()
    _save_atomically(model, heldout_accuracy, path)
    return model
