import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vqz.cli import main
from vqz.eval.features import clean_resize, feature_extractor
from vqz.eval.fid import (feature_statistics, frechet_distance, frechet_distance_from_statistics,
                          kernel_inception_distance)
from vqz.eval.image_sets import evaluate_images, load_image, paired_files
from vqz.eval.images import ssim
from vqz.eval.report import write_report


def _gaussian(n, mean, cov, seed):
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(mean, cov, size=n)


def _random_cov(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def _scipy_fid(mu1, s1, mu2, s2):
    linalg = pytest.importorskip("scipy.linalg")
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_fid_matches_scipy_sqrtm_and_the_diagonal_closed_form():
    d = 8
    mu1, mu2 = np.random.default_rng(1).normal(size=(2, d))
    s1, s2 = _random_cov(d, 2), _random_cov(d, 3)
    expected = _scipy_fid(mu1, s1, mu2, s2)
    assert expected > 1
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)

    # from samples: the same formula on the sample mean and unbiased covariance
    a, b = _gaussian(400, mu1, s1, 4), _gaussian(300, mu2, s2, 5)
    sample = _scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(sample, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(sample, rel=1e-5)

    # diagonal covariances: ||mu1 - mu2||² + Σ (√s1 - √s2)²
    v1, v2 = np.random.default_rng(6).uniform(0.1, 3.0, size=(2, d))
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance_from_statistics(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        closed, rel=1e-10)


def test_fid_of_a_set_with_itself_and_with_its_translate():
    a = torch.randn(10, 32, dtype=torch.float64)  # fewer images than dimensions: singular covariance
    assert frechet_distance(a, a) < 1e-9
    shift = torch.randn(32, dtype=torch.float64)
    # translating a set moves only the mean term; the 22 zero eigenvalues each leave a ~1e-8
    # square root of rounding noise in the trace term
    assert frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)
    mu, cov = feature_statistics(a)
    assert torch.allclose(cov, torch.from_numpy(np.cov(a.numpy(), rowvar=False)))


def test_fid_and_kid_reject_bad_feature_sets():
    with pytest.raises(ValueError, match="at least 2 images per set.*got 1 and 5"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="differ in dimension.*4 vs 6.*same feature extractor"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="at least 2 images per set"):
        kernel_inception_distance(torch.randn(5, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kernel_inception_distance(torch.randn(5, 4), torch.randn(5, 4), subset_size=1)


def _kid_double_loop(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³, written out term by term."""
    m, d = x.shape

    def k(a, b):
        return (np.dot(a, b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_double_loop_estimator():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(8, 5)), rng.normal(0.5, 1.3, size=(8, 5))
    # subset size = set size: every subset is a permutation of the whole set, and the estimator
    # does not depend on the order
    kid = kernel_inception_distance(x, y, subset_size=8, subsets=3)
    assert kid["mean"] == pytest.approx(_kid_double_loop(x, y), rel=1e-10)
    assert kid["std"] < 1e-12 and kid["subset_size"] == 8 and kid["subsets"] == 3

    # smaller subsets: seeded draws, and their mean estimates the whole-set U-statistic
    x, y = rng.normal(size=(40, 5)), rng.normal(0.3, 1.0, size=(40, 5))
    kid = kernel_inception_distance(x, y, subset_size=10, subsets=400, seed=3)
    assert kid == kernel_inception_distance(x, y, subset_size=10, subsets=400, seed=3)
    assert kid != kernel_inception_distance(x, y, subset_size=10, subsets=400, seed=4)
    assert kid["subset_size"] == 10 and kid["std"] > 0
    assert abs(kid["mean"] - _kid_double_loop(x, y)) < 4 * kid["std"] / np.sqrt(400)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    cov = _random_cov(6, 8)
    a, b = _gaussian(600, np.zeros(6), cov, 9), _gaussian(600, np.zeros(6), cov, 10)
    shifted = _gaussian(600, np.full(6, 0.5), cov, 11)
    same = kernel_inception_distance(a, b, subset_size=300, subsets=10)["mean"]
    apart = kernel_inception_distance(a, shifted, subset_size=300, subsets=10)["mean"]
    assert apart > 0.5 and abs(same) < 0.05 * apart


def test_clean_resize_is_pil_antialiased_bicubic():
    a = np.random.default_rng(12).random((64, 48)).astype(np.float32)
    pil = np.asarray(Image.fromarray(a, mode="F").resize((17, 23), Image.BICUBIC)).clip(0, 1)
    ours = clean_resize(torch.from_numpy(a)[None, None], (23, 17))[0, 0].numpy()
    assert np.abs(ours - pil).max() < 1e-5
    # a one-pixel checkerboard shrunk 4x is flat gray, not an aliased pattern
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    small = clean_resize(checker.float().expand(1, 3, 64, 64), (16, 16))
    assert small.std() < 0.01 and small.mean() == pytest.approx(0.5, abs=0.01)


def test_timm_features_drop_only_the_classifier(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    extract = feature_extractor(f"timm:test_efficientnet:{tmp_path / 'w.pt'}")
    images = torch.rand(3, 3, 40, 52)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (clean_resize(images, (160, 160)) - mean) / std
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(extract(images), expected, atol=1e-5)

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        feature_extractor(f"timm:test_efficientnet:{tmp_path / 'other.pt'}")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        feature_extractor("timm:no_such_net")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        feature_extractor(f"timm:test_efficientnet:{tmp_path / 'missing.pt'}")


# Sets: 6 pairs, 4 of 32x40 and 2 of 36x36 (two size groups), written losslessly as PNG.
SIZES = [(40, 32)] * 4 + [(36, 36)] * 2  # PIL (width, height)


def _write(folder, arrays, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / (names[i] if names else f"img_{i:02d}.png"))


@pytest.fixture
def sets(tmp_path):
    """(ref, same, noisy, darker folders; ref and noisy uint8 arrays)."""
    rng = np.random.default_rng(13)
    refs, noisy = [], []
    for w, h in SIZES:
        ramp = np.linspace(20, 220, w)[None, :, None] + rng.normal(0, 20, size=(h, w, 3))
        refs.append(ramp.clip(0, 255).astype(np.uint8))
        noise = rng.integers(-12, 13, size=(h, w, 3))
        noisy.append((refs[-1].astype(int) + noise).clip(0, 255).astype(np.uint8))
    _write(tmp_path / "ref", refs)
    _write(tmp_path / "same", refs)
    _write(tmp_path / "noisy", noisy)
    _write(tmp_path / "darker", [(r * 0.6).astype(np.uint8) for r in refs])
    return tmp_path, refs, noisy


def _expected_psnr(a, b):
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return 10 * np.log10(1 / mse)


@pytest.fixture
def no_lpips_packages(monkeypatch):
    """Neither lpips nor torchmetrics importable, whatever is installed."""
    monkeypatch.setitem(sys.modules, "lpips", None)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)


@pytest.fixture
def timm_spec(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "feat.pt")
    return f"timm:test_vit:{tmp_path / 'feat.pt'}"


def _run(ref, test, out, *extra):
    return main(["eval", "images", "--ref", str(ref), "--test", str(test), "--out", str(out),
                 "--device", "cpu", "--batch-size", "4", *extra])


def test_cli_end_to_end_with_timm_features(sets, timm_spec, no_lpips_packages, capsys):
    root, refs, noisy = sets
    assert _run(root / "ref", root / "noisy", root / "out", "--features", timm_spec) == 0
    stdout = capsys.readouterr().out
    assert "PSNR" in stdout and "FID" in stdout and "LPIPS skipped: " in stdout
    result = json.loads((root / "out" / "metrics.json").read_text())
    metrics = result["metrics"]
    assert result["count"] == 6 and [p["ref"] for p in result["pairs"]] == [
        f"img_{i:02d}.png" for i in range(6)]
    per_pair = [_expected_psnr(r, n) for r, n in zip(refs, noisy)]
    assert [p["psnr"] for p in result["pairs"]] == pytest.approx(per_pair, abs=1e-3)
    assert metrics["psnr"]["value"] == pytest.approx(np.mean(per_pair), abs=1e-3)
    assert metrics["psnr"]["unit"] == "dB" and 25 < metrics["psnr"]["value"] < 35
    assert 0.5 < metrics["ssim"]["value"] < 0.999
    assert "pip install lpips" in metrics["lpips"]["skipped"]

    # FID/KID equal those of the extractor's features computed here, set by set
    extract = feature_extractor(timm_spec)
    with torch.no_grad():
        def feats(folder):
            files = sorted(folder.glob("*.png"))
            return torch.cat([extract(torch.stack([load_image(f) for f in files[:4]])),
                              extract(torch.stack([load_image(f) for f in files[4:]]))])
        ref_f, test_f = feats(root / "ref"), feats(root / "noisy")
    assert metrics["fid"]["value"] == pytest.approx(frechet_distance(ref_f, test_f), rel=1e-4)
    assert metrics["fid"]["value"] > 0 and metrics["fid"]["features"] == timm_spec
    kid = kernel_inception_distance(ref_f, test_f, subset_size=1000)
    assert metrics["kid"]["value"] == pytest.approx(kid["mean"], rel=1e-4, abs=1e-9)
    assert metrics["kid"]["subset_size"] == 6

    report = (root / "out" / "report.html").read_text()
    for label in ("PSNR", "SSIM", "LPIPS", "FID", "KID"):
        assert label in report
    assert "LPIPS skipped:" in report and report.count("data:image/png;base64,") == 12


def test_without_inception_fid_is_skipped_and_the_rest_runs(sets, no_lpips_packages, capsys):
    root, refs, noisy = sets
    assert _run(root / "ref", root / "noisy", root / "out") == 0
    stdout = capsys.readouterr().out
    assert "FID/KID skipped: torchmetrics and torch-fidelity are needed" in stdout
    assert "--features timm:MODEL_NAME:CHECKPOINT" in stdout
    metrics = json.loads((root / "out" / "metrics.json").read_text())["metrics"]
    assert "skipped" in metrics["fid"] and "skipped" in metrics["kid"]
    assert metrics["psnr"]["value"] == pytest.approx(
        np.mean([_expected_psnr(r, n) for r, n in zip(refs, noisy)]), abs=1e-3)
    assert "FID/KID skipped:" in (root / "out" / "report.html").read_text()


def test_python_api_with_callables_keeps_pair_order_across_size_groups(sets):
    root, refs, noisy = sets

    def channel_means(images):
        return images.mean(dim=(2, 3))

    def mean_abs(test, ref):
        return (test - ref).abs().flatten(1).mean(1)

    # batch 5: the first batch mixes both sizes, so pairs are regrouped and must be put back
    result = evaluate_images(root / "ref", root / "noisy", features=channel_means,
                             perceptual=mean_abs, batch_size=5, device="cpu", progress=False)
    expected = [np.abs(n.astype(float) - r.astype(float)).mean() / 255 for r, n in zip(refs, noisy)]
    assert [p["lpips"] for p in result["pairs"]] == pytest.approx(expected, rel=1e-5)
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255 for a in refs + noisy]
    assert [p["ssim"] for p in result["pairs"]] == pytest.approx(
        [ssim(n, r).item() for r, n in zip(tensors[:6], tensors[6:])], rel=1e-5)
    means = np.array([a.reshape(-1, 3).mean(0) / 255 for a in refs + noisy])
    assert result["metrics"]["fid"]["value"] == pytest.approx(
        frechet_distance(means[:6], means[6:]), rel=1e-4)
    assert result["features"] == "channel_means"

    # identical folders: PSNR at its 120 dB cap (MSE floored at 1e-12), SSIM 1, FID 0
    same = evaluate_images(root / "ref", root / "same", features=channel_means,
                           perceptual=mean_abs, device="cpu", progress=False)["metrics"]
    assert same["psnr"]["value"] == pytest.approx(120.0)
    assert same["ssim"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert same["lpips"]["value"] == 0 and same["fid"]["value"] < 1e-9

    # a single pair: paired metrics still run, FID/KID say why they cannot
    for name in ("a", "b"):
        _write(root / f"one_{name}", refs[:1])
    one = evaluate_images(root / "one_a", root / "one_b", features=channel_means,
                          perceptual=mean_abs, device="cpu", progress=False)["metrics"]
    assert one["psnr"]["value"] == pytest.approx(120.0)
    assert "at least 2 images each; got 1" in one["fid"]["skipped"]
    assert one["kid"] == one["fid"]


def test_lpips_is_skipped_for_images_too_small_for_alexnet(tmp_path):
    image = np.random.default_rng(14).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    _write(tmp_path / "a", [image, image])
    _write(tmp_path / "b", [image, image])
    metrics = evaluate_images(tmp_path / "a", tmp_path / "b", features=lambda x: x.mean((2, 3)),
                              device="cpu", progress=False)["metrics"]
    assert "at least 31x31 pixels" in metrics["lpips"]["skipped"] and "24x20" in metrics["lpips"]["skipped"]


def test_report_shows_at_most_64_pairs_spread_over_the_set(tmp_path):
    images = np.random.default_rng(15).integers(0, 256, size=(70, 12, 12, 3), dtype=np.uint8)
    _write(tmp_path / "a", images)
    _write(tmp_path / "b", images[::-1])
    result = evaluate_images(tmp_path / "a", tmp_path / "b", features=lambda x: x.mean((2, 3)),
                             perceptual=lambda t, r: (t - r).abs().mean((1, 2, 3)), device="cpu",
                             progress=False)
    _, html_path = write_report(result, tmp_path / "out")
    report = html_path.read_text()
    assert "64 of 70 shown" in report and report.count("data:image/png;base64,") == 128
    assert "img_00.png" in report and "img_68.png" in report  # first and near the end


def test_bad_inputs_name_the_problem_and_the_fix(sets, capsys):
    root, refs, _ = sets
    with pytest.raises(ValueError, match="reference folder.*missing does not exist; pass a folder"):
        paired_files(root / "missing", root / "ref")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* under .*empty .test folder"):
        paired_files(root / "ref", root / "empty")
    _write(root / "fewer", refs[:4])
    with pytest.raises(ValueError, match="holds 6 images but the test folder .*fewer holds 4.*"
                       r"same number.*only in test: \[\]"):
        paired_files(root / "ref", root / "fewer")
    _write(root / "rotated", [np.ascontiguousarray(r.transpose(1, 0, 2)) for r in refs])
    with pytest.raises(ValueError, match=r"ref/img_00.png is 40x32 but its pair .*rotated/img_00.png "
                       r"is 32x40; paired images must have the same size"):
        paired_files(root / "ref", root / "rotated")
    with pytest.raises(ValueError, match="unknown --features value 'clip'; use inception, "
                       r"inception:WEIGHTS.pth or timm:MODEL_NAME\[:CHECKPOINT\]"):
        evaluate_images(root / "ref", root / "same", features="clip", progress=False)
    with pytest.raises(ValueError, match="unknown --features value 'timm:'"):
        evaluate_images(root / "ref", root / "same", features="timm:", progress=False)
    with pytest.raises(ValueError, match="KID needs subset_size >= 2"):
        evaluate_images(root / "ref", root / "same", kid_subset_size=1, progress=False)
    with pytest.raises(FileNotFoundError, match="Inception weights .*nope.pth do not exist"):
        evaluate_images(root / "ref", root / "same", features=f"inception:{root / 'nope.pth'}",
                        progress=False)

    # the command reports them as errors (exit 1), not tracebacks
    assert _run(root / "ref", root / "fewer", root / "out") == 1
    assert "holds 4" in capsys.readouterr().err
    assert _run(root / "ref", root / "same", root / "out", "--features", "clip") == 1
    assert "unknown --features value" in capsys.readouterr().err
    assert not (root / "out").exists()
