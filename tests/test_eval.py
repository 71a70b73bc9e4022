"""Evaluation: Fréchet distance, digits classifier metrics, FID/IS/precision-recall plumbing."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from switchdit_dist.cli import main
from switchdit_dist.errors import UserError
from switchdit_dist.eval.digits_classifier import CLASSIFIER_FILE, accuracy, load_or_train_classifier
from switchdit_dist.eval.digits_data import digits_split, load_digit_images
from switchdit_dist.eval.digits_metrics import DigitsEvaluator
from switchdit_dist.eval.frechet import GaussianStats, frechet_distance, frechet_distance_between
from switchdit_dist.eval.image_metrics import Reference, inception_score, precision_recall, score_images
from switchdit_dist.eval.inception import FIDInceptionV3, load_inception

# --- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_commuting_covariances():
    # Same eigenvectors: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    # One dimension: (mu1 - mu2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_path_equals_the_dense_one():
    # Fewer samples than dimensions: the n x n formulation must give the D x D result (which is
    # the less precise one here: square roots of rounding noise in the zero eigenvalues).
    rng = np.random.default_rng(2)
    a, b = GaussianStats.of(rng.normal(size=(7, 20))), GaussianStats.of(rng.normal(size=(9, 20)) + 0.3)
    assert a.factor is not None and b.factor is not None
    dense_a, dense_b = GaussianStats(a.mu, a.sigma), GaussianStats(b.mu, b.sigma)
    expected = frechet_distance_between(dense_a, dense_b)
    assert frechet_distance_between(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_between(a, dense_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_between(dense_a, b) == pytest.approx(expected, rel=1e-6)


# --- digits --------------------------------------------------------------------------------------


def test_digits_are_preprocessed_like_the_demo_training_data():
    from switchdit_dist.data.writers.digits import digits_latents

    images, labels = load_digit_images()
    demo_images, demo_labels = digits_latents(16)
    assert torch.equal(images, torch.from_numpy(demo_images))
    assert torch.equal(labels, torch.from_numpy(demo_labels))


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """Classifier trained once into a private cache directory (as SWITCHDIT_CACHE would point)."""
    directory = tmp_path_factory.mktemp("switchdit-cache")
    classifier = load_or_train_classifier(directory)
    return directory, classifier


def test_classifier_reaches_97_percent_on_heldout_digits_and_is_cached(digits_cache):
    directory, classifier = digits_cache
    _, (heldout_x, heldout_y) = digits_split()
    assert accuracy(classifier, heldout_x, heldout_y) >= 0.97
    path = directory / CLASSIFIER_FILE
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    reloaded = load_or_train_classifier(directory)
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    with torch.no_grad():
        assert torch.equal(reloaded(heldout_x), classifier(heldout_x))


def test_unreadable_cache_is_a_clear_error(tmp_path):
    (tmp_path / CLASSIFIER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=CLASSIFIER_FILE):
        load_or_train_classifier(tmp_path)


def test_real_digits_score_far_better_than_noise(digits_cache):
    _, classifier = digits_cache
    _, (heldout_x, heldout_y) = digits_split()
    half = len(heldout_x) // 2
    evaluator = DigitsEvaluator(classifier, reference_images=heldout_x[:half])
    real = evaluator.score(heldout_x[half:], heldout_y[half:])
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(heldout_x[half:].shape, generator=generator) * 2 - 1
    fake = evaluator.score(noise, heldout_y[half:])
    assert real.accuracy >= 0.97
    assert fake.accuracy <= 0.3
    assert fake.frechet_distance > 10 * real.frechet_distance
    assert real.num_samples == len(heldout_x) - half
    assert all(0.0 <= a <= 1.0 for a in real.per_class_accuracy)


def test_digit_batches_are_checked(digits_cache):
    evaluator = DigitsEvaluator(digits_cache[1])
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        evaluator.score(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        evaluator.score(torch.zeros(4, 1, 16, 16), torch.full((4,), 10))


def write_digits_model(path):
    from switchdit_dist.export.load import save_model_file
    from switchdit_dist.models.registry import build_model, model_config

    config = model_config(
        "switch-dit", "tiny", 2, input_size=16, in_channels=1, num_classes=10, num_experts=4
    )
    torch.manual_seed(0)
    save_model_file(path, build_model(config).state_dict(), config)


def test_cli_eval_digits_samples_a_model_and_scores_it(digits_cache, tmp_path, monkeypatch, capsys):
    pytest.importorskip("switchdit_dist.diffusion")
    monkeypatch.setenv("SWITCHDIT_CACHE", str(digits_cache[0]))
    model_path = tmp_path / "digits.safetensors"
    write_digits_model(model_path)
    argv = ["eval", "--checkpoint", str(model_path), "--digits", "--per-class", "2", "--steps", "4"]
    assert main(argv + ["--device", "cpu", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["num_samples"] == 20 and first["steps"] == 4
    assert 0.0 <= first["accuracy"] <= 1.0 and first["frechet_distance"] > 0
    # Same seed, same samples, same scores; DDPM through the same path.
    assert main(argv + ["--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frechet_distance"] == first["frechet_distance"]
    assert main(argv + ["--device", "cpu", "--sampler", "ddpm", "--cfg-scale", "1"]) == 0
    assert "class accuracy" in capsys.readouterr().out


def test_cli_eval_digits_refuses_a_non_digits_model(tmp_path, capsys):
    from switchdit_dist.export.load import save_model_file
    from switchdit_dist.models.registry import build_model, model_config

    config = model_config("dit", "tiny", 2, input_size=8, num_classes=10)
    save_model_file(tmp_path / "m.safetensors", build_model(config).state_dict(), config)
    assert main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--digits", "--device", "cpu"]) == 2
    assert "not a digits model" in capsys.readouterr().err


# --- FID / IS / precision-recall plumbing -------------------------------------------------------


def test_inception_score_closed_form():
    classes = 8
    confident = np.full((4 * classes, classes), -1e4)
    confident[np.arange(4 * classes), np.arange(4 * classes) % classes] = 0.0
    # Every image certain of its class, classes evenly used: IS = number of classes.
    assert inception_score(confident, splits=1)[0] == pytest.approx(classes)
    # All images alike: p(y|x) = p(y), IS = 1.
    assert inception_score(np.zeros((10, classes)), splits=2) == pytest.approx((1.0, 0.0))


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # k=1: every real ball has radius 1, so 0.5 is inside and 10 is not -> precision 1/2.
    # The fake balls have radius 9.5 and cover every real point -> recall 1.
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))
    assert precision_recall(real, real, k=1) == pytest.approx((1.0, 1.0))
    assert precision_recall(real, real + 100.0, k=1) == pytest.approx((0.0, 0.0))


@pytest.fixture(scope="module")
def random_inception():
    # 75 px is the smallest input the network takes: fast on CPU, same code path as 299.
    return FIDInceptionV3(input_size=75).init_random_weights_(seed=0).eval()


def random_images(seed, n=24, size=32, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 160, size=(n, size, size, 3))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(random_inception):
    images = random_images(0)
    features_ref = Reference(stats=None, images=images)
    same = score_images(images, features_ref, random_inception, batch_size=16)
    other_draw = score_images(random_images(1), features_ref, random_inception, batch_size=16)
    shifted = score_images(random_images(1, shift=90), features_ref, random_inception, batch_size=16)
    assert abs(same.fid) < 1e-6 * shifted.fid
    assert same.precision == same.recall == 1.0
    assert shifted.fid > 5 * other_draw.fid
    assert 1.0 <= same.inception_score <= 1008
    assert same.num_samples == same.num_reference == 24


def test_inception_weights_load_from_pth_and_safetensors(random_inception, tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        expected = random_inception(x)[0]
        for name in ("pt_inception.pth", "inception.safetensors"):
            assert torch.equal(load_inception(tmp_path / name, input_size=75)(x)[0], expected)
    state["fc.weight"] = state["fc.weight"][:1000]  # torchvision's ImageNet head, not the FID graph's
    torch.save(state, tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="wrong shape.*fc.weight"):
        load_inception(tmp_path / "imagenet.pth")


def test_cli_eval_npz_against_images_and_statistics(random_inception, tmp_path, capsys):
    torch.save(random_inception.state_dict(), tmp_path / "inception.pth")
    samples, reference = random_images(2, n=5, size=16), random_images(3, n=5, size=16)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    common = ["--inception", str(tmp_path / "inception.pth"), "--device", "cpu", "--json"]
    assert (
        main(["eval", "--npz", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), *common])
        == 0
    )
    from_images = json.loads(capsys.readouterr().out)
    assert from_images["num_samples"] == from_images["num_reference"] == 5
    assert from_images["fid"] > 0 and from_images["precision"] is not None
    # Reference given as statistics only (as ADM's reference batches carry them): same FID, no PR.
    network = load_inception(tmp_path / "inception.pth")
    ref_stats = GaussianStats.of(score_features(network, reference))
    np.savez(tmp_path / "stats.npz", mu=ref_stats.mu, sigma=ref_stats.sigma)
    assert (
        main(["eval", "--npz", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "stats.npz"), *common])
        == 0
    )
    from_stats = json.loads(capsys.readouterr().out)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    assert from_stats["precision"] is None


def score_features(network, images):
    from switchdit_dist.eval.image_metrics import inception_outputs

    return inception_outputs(images, network)[0]


def test_cli_eval_npz_errors_name_the_file_and_key(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    weights = tmp_path / "missing.pth"
    assert main(["eval", "--npz", str(tmp_path / "bad.npz"), "--inception", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "'arr_0'" in err
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    assert main(["eval", "--npz", str(tmp_path / "float.npz"), "--inception", str(weights)]) == 2
    assert "expected uint8 images" in capsys.readouterr().err
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", "--npz", str(tmp_path / "ok.npz"), "--inception", str(weights)]) == 2
    assert "missing.pth not found" in capsys.readouterr().err
