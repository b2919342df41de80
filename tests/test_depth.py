import json
import math

import numpy as np
import pytest
import torch

import vqz
from vqz.eval.depth import DepthFolder, DepthMeter, crop_mask, depth_metrics, read_depth
from vqz.eval.images import sqnr

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------- metrics

def test_metrics_by_hand_on_4x4():
    # four valid pixels (gt 1, 2, 4, 5 m); the rest is missing (0), too far (15 m > 10) or both
    gt = np.array([[1, 2, 0, 15],
                   [4, 5, 0, 0],
                   [0, 15, 0, 0],
                   [0, 0, 15, 0]], dtype=np.float32)
    pred = np.array([[1, 1, 9, 9],
                     [5, 3, np.nan, 9],
                     [9, 9, 9, 9],
                     [9, 9, 9, 9]], dtype=np.float32)
    m = depth_metrics(pred, gt, dataset="nyu")  # a 4x4 Eigen crop is the whole frame
    # per pixel: |p-g| = 0, 1, 1, 2; ratios max(p/g, g/p) = 1, 2, 1.25, 5/3
    assert m["valid_pixels"] == 4
    assert m["abs_rel"] == pytest.approx((0 + 1 / 2 + 1 / 4 + 2 / 5) / 4)
    assert m["sq_rel"] == pytest.approx((0 + 1 / 2 + 1 / 4 + 4 / 5) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1 + 4) / 4))
    logs = [0, math.log(2), math.log(1.25), math.log(5 / 3)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 4))
    assert m["log10"] == pytest.approx(sum(logs) / math.log(10) / 4)
    # thresholds are strict: the ratio 1.25 is not below 1.25
    assert (m["d1"], m["d2"], m["d3"]) == (0.25, 0.5, 0.75)


def test_prediction_is_clamped_to_the_valid_range():
    gt = np.full((4, 4), 5.0)
    pred = np.full((4, 4), 5.0)
    pred[0, 0], pred[0, 1] = 40.0, 0.0  # clamped to 10 m and 1e-3 m
    m = depth_metrics(pred, gt, dataset="nyu")
    assert m["abs_rel"] == pytest.approx((5 / 5 + (5 - 1e-3) / 5) / 16)


def test_crop_masks():
    nyu = crop_mask(480, 640, "nyu")
    assert nyu.sum() == (471 - 45) * (601 - 41)
    assert nyu[45, 41] and nyu[470, 600] and not nyu[44, 41] and not nyu[45, 40]
    assert not nyu[471, 100] and not nyu[100, 601]
    big = crop_mask(960, 1280, "nyu")  # scaled proportionally
    rows, cols = big.any(1).nonzero()[:, 0], big.any(0).nonzero()[:, 0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (90, 941, 82, 1201)
    kitti = crop_mask(375, 1242, "kitti")  # Garg crop of a KITTI frame
    rows, cols = kitti.any(1).nonzero()[:, 0], kitti.any(0).nonzero()[:, 0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (153, 370, 44, 1196)


def test_pixels_outside_the_crop_and_range_are_ignored():
    gt = torch.full((375, 1242), 30.0)
    pred = gt.clone()
    pred[~crop_mask(375, 1242, "kitti")] = 500.0
    gt[200, 200], pred[200, 200] = 95.0, 1.0  # beyond KITTI's 80 m: not measured
    m = depth_metrics(pred, gt, dataset="kitti")
    assert m["abs_rel"] == 0 and m["d1"] == 1
    with pytest.raises(ValueError, match="no valid"):
        depth_metrics(pred, torch.zeros_like(gt), dataset="kitti")
    with pytest.raises(ValueError, match="same size"):
        depth_metrics(pred[:10], gt, dataset="kitti")


@pytest.mark.parametrize("align,make", [
    ("median", lambda g: 0.2 * g),
    ("lstsq", lambda g: (g - 0.5) / 3),
    ("lstsq-disparity", lambda g: 2.5 / g + 0.7),  # relative disparity, as Depth Anything outputs
])
def test_alignment_recovers_a_known_scale_and_shift(align, make):
    torch.manual_seed(0)
    gt = torch.rand(48, 64, dtype=torch.float64) * 8 + 1
    gt[0, :5] = 0  # missing pixels take no part in the fit
    pred = make(gt)
    pred[0, :5] = 123.0
    m = depth_metrics(pred, gt, dataset="nyu", align=align)
    assert m["abs_rel"] < 1e-9 and m["rmse"] < 1e-8 and m["d1"] == 1
    assert depth_metrics(pred, gt, dataset="nyu")["abs_rel"] > 0.1  # unaligned it is far off


def test_meter_averages_per_image():
    meter = DepthMeter()
    gt = np.full((4, 4), 2.0)
    meter.update(depth_metrics(np.full((4, 4), 3.0), gt))  # abs_rel 0.5 over 16 pixels
    one_valid = np.zeros((4, 4))
    one_valid[0, 0] = 2.0
    meter.update(depth_metrics(np.full((4, 4), 2.0), one_valid))  # abs_rel 0 over 1 pixel
    assert meter.compute()["abs_rel"] == pytest.approx(0.25)  # per pixel it would be 8/17


# ---------------------------------------------------------------- data

def _write_pair(folder, name, size=(40, 48), depth_size=None, npy=False, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    dh, dw = depth_size or size
    depth_m = rng.uniform(0.5, 9.0, (dh, dw))
    if npy:
        np.save(folder / f"{name}_depth.npy", depth_m.astype(np.float32))
    else:
        Image.fromarray(np.round(depth_m * 1000).astype(np.uint16)).save(folder / f"{name}_depth.png")
    return depth_m


def test_depth_folder_reads_millimetre_pngs_and_metre_npys(tmp_path):
    png = _write_pair(tmp_path, "a", seed=1)
    npy = _write_pair(tmp_path, "b", npy=True, seed=2)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "no_depth.jpg")  # ignored: no depth map
    data = DepthFolder(tmp_path)
    assert [p.image.name for p in data.pairs] == ["a.png", "b.png"]
    image, depth = data[0]
    assert image.size == (48, 40) and depth.shape == (40, 48)
    assert np.abs(depth.numpy() - png).max() <= 0.0005 + 1e-6  # 1 mm quantization
    assert np.allclose(data[1][1].numpy(), npy)
    assert read_depth(tmp_path / "a_depth.png").dtype == np.float32


def test_depth_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image/depth pairs"):
        DepthFolder(tmp_path)
    _write_pair(tmp_path, "a", size=(40, 48), depth_size=(20, 24))
    with pytest.raises(ValueError, match="must match"):
        DepthFolder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        DepthFolder(tmp_path / "missing")


# ---------------------------------------------------------------- adapters

def tiny_depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, image_size=56, patch_size=14,
                            out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32],
                                 reassemble_hidden_size=32, fusion_hidden_size=16,
                                 head_hidden_size=8, patch_size=14)
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(config).eval(), 56


def tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8,
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])
    torch.manual_seed(0)
    return DPTForDepthEstimation(config).eval(), 32


@pytest.mark.parametrize("build", [tiny_depth_anything, tiny_dpt])
def test_depth_adapters_quantize_and_round_trip(build, tmp_path):
    from vqz.pipelines import adapter_for
    from vqz.pipelines.depth import depth_forward

    model, size = build()
    adapter = adapter_for(model)
    assert adapter.name == type(model).__name__
    assert all(adapter.notes[r.pattern] for r in adapter.default_rules)
    calib = [{"pixel_values": torch.randn(2, 3, size, size)} for _ in range(3)]
    x = torch.randn(2, 3, size, size)
    ref = depth_forward(model, x)
    assert ref.shape[0] == 2
    # generic names run the depth recipes here (w8a8 -> depth-w8a8); few reconstruction steps
    for preset, bound, extra in (("w8a8", 25.0, {}), ("w8a8-static", 25.0, {}),
                                 ("w4a8", None, {"reconstruct": 5})):
        fresh, _ = build()
        q = vqz.quantize(fresh, preset, calib=calib, **extra)
        out = depth_forward(q, x)
        assert torch.isfinite(out).all()
        if bound:
            assert sqnr(out, ref) >= bound
        kept = {row["name"] for row in vqz.summary(q) if row["status"] != "quantized"}
        assert any("patch_embeddings" in n for n in kept)
        assert "neck.convs.0" in kept and any("fusion_stage.layers.3" in n for n in kept)
        assert ("head.conv3" in kept) or ("head.head.4" in kept)
        assert "neck.convs.1" not in kept
        vqz.save(q, tmp_path / preset)
        skeleton = type(model)(model.config).eval()
        loaded = vqz.load(skeleton, tmp_path / preset)
        assert torch.equal(depth_forward(loaded, x), out)


# ---------------------------------------------------------------- CLI

@pytest.fixture
def depth_model_dir(tmp_path):
    from transformers import DPTImageProcessor

    model, size = tiny_dpt()
    folder = tmp_path / "tiny-dpt"
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False
                      ).save_pretrained(folder)
    return folder


def test_cli_eval_depth_end_to_end(depth_model_dir, tmp_path, capsys):
    from vqz.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _write_pair(data, f"img{i}", seed=i)
    out = tmp_path / "depth.json"
    rc = main(["eval", "depth", "--model", str(depth_model_dir), "--data", str(data), "--preset",
               "w8a8-static", "--calib-count", "2", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "abs_rel" in printed.out and "w8a8-static" in printed.out
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["calib_images"] == 2
    assert result["align"] == "lstsq-disparity" and result["averaging"] == "per image"
    for side in ("full_precision", "quantized"):
        assert all(math.isfinite(v) for v in result[side].values())
        assert 0 <= result[side]["d1"] <= 1 and result[side]["abs_rel"] > 0


def test_cli_eval_depth_errors(depth_model_dir, tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    from vqz.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _write_pair(data, "a")
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(vit)
    rc = main(["eval", "depth", "--model", str(vit), "--data", str(data), "--preset", "w8a8"])
    assert rc == 1 and "not a depth estimator" in capsys.readouterr().err

    _write_pair(data, "b", size=(40, 48), depth_size=(40, 47))
    rc = main(["eval", "depth", "--model", str(depth_model_dir), "--data", str(data),
               "--preset", "w8a8"])
    assert rc == 1 and "must match" in capsys.readouterr().err
