"""FID, Inception Score and precision/recall for image samples stored as ``.npz`` files.

Sample files follow the ADM / DiT evaluation suites: uint8 images [N, H, W, 3] under ``arr_0``.
A reference file is either another sample file, or precomputed statistics ``mu`` [2048] and
``sigma`` [2048, 2048] (the ADM reference batches carry both; then the stored statistics are used
for FID and the images only for precision/recall).

Precision and recall follow Kynkäänniemi et al. (2019): each feature set spans a manifold, the
union of balls around its points whose radius is the distance to the k-th nearest neighbour in
the same set; precision is the share of generated points inside the real manifold, recall the
share of real points inside the generated one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from switchdit_dist.errors import UserError
from switchdit_dist.eval.frechet import GaussianStats, frechet_distance_between
from switchdit_dist.eval.inception import POOL_DIM, FIDInceptionV3

SAMPLES_KEY = "arr_0"


def _open_npz(path: Path):
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise UserError(f"cannot read {path} as an .npz file: {err}") from None


def check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{where}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[0] < 2:
        raise UserError(f"{where}: need at least 2 images, got {images.shape[0]}")
    return images


def load_samples(path: str | Path) -> np.ndarray:
    """uint8 images [N, H, W, 3] from key ``arr_0`` of an ``.npz``."""
    path = Path(path)
    with _open_npz(path) as data:
        if SAMPLES_KEY not in data:
            raise UserError(
                f"{path}: no key {SAMPLES_KEY!r} (found {sorted(data.files)}); expected sample images"
            )
        return check_images(data[SAMPLES_KEY], f"{path}[{SAMPLES_KEY!r}]")


@dataclass
class Reference:
    """What a reference file provides: stored statistics and/or images."""

    stats: GaussianStats | None
    images: np.ndarray | None


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    with _open_npz(path) as data:
        stats = None
        if "mu" in data or "sigma" in data:
            if not ("mu" in data and "sigma" in data):
                raise UserError(
                    f"{path}: reference statistics need both 'mu' and 'sigma' (found {sorted(data.files)})"
                )
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
                raise UserError(
                    f"{path}: 'mu' must be [{POOL_DIM}] and 'sigma' [{POOL_DIM}, {POOL_DIM}], "
                    f"got {mu.shape} and {sigma.shape}"
                )
            stats = GaussianStats(mu, sigma)
        images = check_images(data[SAMPLES_KEY], f"{path}[{SAMPLES_KEY!r}]") if SAMPLES_KEY in data else None
    if stats is None and images is None:
        raise UserError(f"{path}: expected 'mu' and 'sigma', or images under {SAMPLES_KEY!r}; found neither")
    return Reference(stats, images)


@torch.no_grad()
def inception_outputs(
    images: np.ndarray, network: FIDInceptionV3, batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features [N, 2048] and logits [N, 1008] (float64) of uint8 images [N, H, W, 3]."""
    network = network.to(device).eval()
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        pool, logit = network(batch.permute(0, 3, 1, 2).float() / 255.0)
        pools.append(pool.double().cpu())
        logits.append(logit.double().cpu())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy()


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and standard deviation over ``splits`` equal parts."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, min(splits, len(log_p))):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, row_batch: int) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + row_batch], b) for i in range(0, len(a), row_batch)])


def manifold_radii(features: torch.Tensor, k: int, row_batch: int = 1024) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(features)}")
    radii = []
    for i in range(0, len(features), row_batch):
        dist = torch.cdist(features[i : i + row_batch], features)
        # The (k+1)-th smallest distance: the smallest is the point itself at 0.
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def share_inside_manifold(
    points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, row_batch: int = 1024
) -> float:
    inside = [
        (torch.cdist(points[i : i + row_batch], manifold) <= radii[None]).any(dim=1)
        for i in range(0, len(points), row_batch)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    precision = share_inside_manifold(fake_t, real_t, manifold_radii(real_t, k))
    recall = share_inside_manifold(real_t, fake_t, manifold_radii(fake_t, k))
    return precision, recall


@dataclass
class ImageScores:
    num_samples: int
    inception_score: float
    inception_score_std: float
    fid: float | None = None
    precision: float | None = None
    recall: float | None = None
    num_reference: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def score_images(
    samples: np.ndarray,
    reference: Reference | None,
    network: FIDInceptionV3,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    nearest_k: int = 3,
    is_splits: int = 10,
) -> ImageScores:
    """IS of ``samples``; FID and precision/recall against ``reference`` when given."""
    features, logits = inception_outputs(samples, network, batch_size, device)
    is_mean, is_std = inception_score(logits, is_splits)
    scores = ImageScores(len(samples), is_mean, is_std)
    if reference is None:
        return scores
    ref_features = None
    if reference.images is not None:
        ref_features, _ = inception_outputs(reference.images, network, batch_size, device)
        scores.num_reference = len(ref_features)
    ref_stats = reference.stats or GaussianStats.of(ref_features)
    scores.fid = frechet_distance_between(ref_stats, GaussianStats.of(features))
    if ref_features is not None and min(len(ref_features), len(features)) > nearest_k:
        scores.precision, scores.recall = precision_recall(ref_features, features, nearest_k)
    return scores
