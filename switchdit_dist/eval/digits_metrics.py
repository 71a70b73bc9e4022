"""Scores for generated digits: class accuracy under the digits classifier, and the Fréchet
distance between real and generated features of its penultimate layer ("digits FID")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from switchdit_dist.eval.digits_classifier import DigitsClassifier, load_or_train_classifier
from switchdit_dist.eval.digits_data import DIGITS_SIZE, NUM_DIGIT_CLASSES, digits_split
from switchdit_dist.eval.frechet import GaussianStats, frechet_distance_between


@dataclass
class DigitsScores:
    num_samples: int
    accuracy: float  # fraction of samples the classifier assigns to their intended label
    frechet_distance: float  # real (reference) vs generated penultimate-layer statistics
    per_class_accuracy: list[float]  # index = label; NaN for a label with no samples

    def to_dict(self) -> dict:
        return asdict(self)


def check_digit_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    shape = (1, DIGITS_SIZE, DIGITS_SIZE)
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"digit images must be [N, {', '.join(map(str, shape))}], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
    if images.shape[0] < 2:
        raise ValueError("need at least 2 images for feature statistics")
    if labels.min() < 0 or labels.max() >= NUM_DIGIT_CLASSES:
        raise ValueError(f"labels must lie in 0..{NUM_DIGIT_CLASSES - 1}")
    if not torch.isfinite(images).all():
        raise ValueError("digit images contain NaN or infinite values")


class DigitsEvaluator:
    """Holds the classifier and the reference feature statistics (default: the held-out digits,
    which the classifier never trained on)."""

    def __init__(
        self, classifier: DigitsClassifier | None = None, reference_images: torch.Tensor | None = None
    ):
        self.classifier = (classifier or load_or_train_classifier()).eval()
        if reference_images is None:
            _, (reference_images, _) = digits_split()
        self.reference = GaussianStats.of(self.features(reference_images))

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        # The classifier only saw [-1, 1]; samples slightly outside it are clipped like pixels.
        images = images.detach().float().cpu().clamp(-1, 1)
        feats, preds = [], []
        for start in range(0, len(images), batch_size):
            f = self.classifier.features(images[start : start + batch_size])
            feats.append(f)
            preds.append(self.classifier.head(f).argmax(dim=1))
        return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[0]

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> DigitsScores:
        """``images`` [N, 1, 16, 16] in [-1, 1] generated for the intended ``labels`` [N]."""
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        check_digit_batch(images, labels)
        features, predicted = self._run(images)
        correct = predicted == labels.numpy()
        per_class = [
            float(correct[labels.numpy() == c].mean()) if (labels == c).any() else float("nan")
            for c in range(NUM_DIGIT_CLASSES)
        ]
        fd = frechet_distance_between(self.reference, GaussianStats.of(features))
        return DigitsScores(len(images), float(correct.mean()), fd, per_class)
