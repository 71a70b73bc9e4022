"""scikit-learn's bundled handwritten digits, preprocessed exactly like the demo's training data.

8x8 images with values 0..16 -> scaled to [-1, 1] -> bilinear upsampling to 16x16
(``align_corners=False``), one channel: [N, 1, 16, 16] float32, labels 0..9.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_SIZE = 16
NUM_DIGIT_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def preprocess_digits(raw: np.ndarray) -> torch.Tensor:
    """Raw digits [N, 8, 8] in 0..16 -> [N, 1, 16, 16] float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = x / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0)


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images [N, 1, 16, 16] in [-1, 1] and labels [N] (long)."""
    from switchdit_dist.extras import need

    digits = need("sklearn.datasets", "the digits data").load_digits()
    return preprocess_digits(digits.images), torch.as_tensor(digits.target, dtype=torch.long)


def split_indices(n: int, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED):
    """A fixed (seeded) permutation cut into train and held-out index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_heldout = int(round(n * heldout_fraction))
    return torch.as_tensor(order[n_heldout:]), torch.as_tensor(order[:n_heldout])


def digits_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, train labels), (held-out images, held-out labels)) of the fixed split."""
    images, labels = load_digit_images()
    train, heldout = split_indices(len(images))
    return (images[train], labels[train]), (images[heldout], labels[heldout])
