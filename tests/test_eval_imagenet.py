import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_tensor

from vqz.eval.classification import CSV_COLUMNS, ImageFolderSet, evaluate_top_k

# Synthetic set: 4 classes x 3 images; image k is a solid PNG of gray level 10 * k (lossless).
TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
FIRST = [0, 2, 3, 1, 0, 3, 2, 0, 0, 0, 1, 1]   # top-1 right for images 0, 3, 6
SECOND = [1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0]  # top-2 also right for images 1, 4


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here: fail weight downloads at once
    return subprocess.run([sys.executable, "-m", "vqz.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _save(path: Path, level: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (level,) * 3).save(path)


@pytest.fixture
def synthetic(tmp_path):
    root = tmp_path / "set"
    for c in (3, 1, 0, 2):  # created out of order: the classes must still come out sorted
        for k in range(len(TRUE)):
            if TRUE[k] == c:
                _save(root / f"n{c:02d}" / f"img{k:02d}.png", 10 * k)
    return root


class TableModel(nn.Module):
    """Reads the image id from the gray level and returns logits ranking FIRST, then SECOND."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        table = torch.zeros(len(TRUE), 4)
        table[torch.arange(len(TRUE)), torch.tensor(SECOND)] = 1.0
        table[torch.arange(len(TRUE)), torch.tensor(FIRST)] = 2.0
        self.register_buffer("table", table)

    def forward(self, x):
        k = (x[:, 0, 0, 0] * 255 / 10).round().long()
        return self.table[k] + self.dummy


def test_image_folder_set_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*<class>"):
        ImageFolderSet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images.*<root>/<class>/<image>"):
        ImageFolderSet(tmp_path / "empty")
    _save(tmp_path / "flat" / "a.png", 0)
    _save(tmp_path / "flat" / "b.jpg", 0)
    with pytest.raises(ValueError, match="directly in it but no class subfolders.*ImageFolder"):
        ImageFolderSet(tmp_path / "flat")
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSet(tmp_path / "hollow")


def test_image_folder_set_layout(synthetic):
    (synthetic / "n04_empty").mkdir()  # an empty class folder keeps its index
    data = ImageFolderSet(synthetic)
    assert data.classes == ["n00", "n01", "n02", "n03", "n04_empty"]
    assert [t for _, t in data.samples] == TRUE
    image, target = data[4]
    assert isinstance(image, Image.Image) and target == 1


def test_top_k_exact(synthetic):
    loader = DataLoader(ImageFolderSet(synthetic, to_tensor), batch_size=5)  # 5 + 5 + 2
    result = evaluate_top_k(TableModel(), loader, ks=(1, 2, 5), progress=False)
    assert result["count"] == 12
    assert result["top1"] == pytest.approx(100 * 3 / 12)
    assert result["top2"] == pytest.approx(100 * 5 / 12)
    assert result["top5"] == pytest.approx(100.0)  # k above the class count: every image counts


def test_data_config_prefers_test_size():
    timm = pytest.importorskip("timm")
    from vqz.eval.classification import data_config

    model = timm.create_model("resnet10t", pretrained=False)  # train 176 / 0.875, test 224 / 0.95
    cfg = data_config(model)
    assert cfg["input_size"] == model.pretrained_cfg["test_input_size"]
    assert cfg["crop_pct"] == model.pretrained_cfg["test_crop_pct"]


def test_cli_bad_inputs(tmp_path, synthetic):
    _save(tmp_path / "flat" / "a.png", 0)
    result = run_cli("eval", "imagenet", "--model", "resnet18", "--data", str(tmp_path / "flat"),
                     "--preset", "w8a8")
    assert result.returncode == 1 and "no class subfolders" in result.stderr
    result = run_cli("eval", "imagenet", "--model", "not_a_model_xyz", "--data", str(synthetic),
                     "--preset", "w8a8")
    assert result.returncode == 1 and "unknown model" in result.stderr
    result = run_cli("eval", "images", "--ref", str(tmp_path / "missing"), "--test", str(synthetic))
    assert result.returncode == 1 and "reference folder (--ref)" in result.stderr


def test_cli_end_to_end_on_imagenet_samples(tmp_path):
    timm = pytest.importorskip("timm")
    if not os.environ.get("VQZ_DATA"):
        pytest.skip("VQZ_DATA is not set (folder holding imagenet-samples/)")
    data = Path(os.environ["VQZ_DATA"]) / "imagenet-samples"
    if not data.is_dir():
        pytest.skip(f"{data} is missing")
    name = "mobilenetv3_small_050"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    torch.save(model.state_dict(), tmp_path / "w.pt")  # both runs see these random weights
    out = tmp_path / "results.csv"
    # w8a8-static calibrates its activation scales: exercises the calibration path too
    result = run_cli("eval", "imagenet", "--model", name, "--checkpoint", str(tmp_path / "w.pt"),
                     "--data", str(data), "--preset", "w8a8-static", "--limit", "64",
                     "--calib-count", "8", "--batch-size", "16", "--workers", "0", "--csv", str(out))
    assert result.returncode == 0, result.stderr
    assert "full precision" in result.stdout and "delta" in result.stdout
    assert "on 64 images" in result.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["preset"] for r in rows] == ["fp", "w8a8-static"]
    cfg = model.pretrained_cfg
    for row in rows:
        assert row["model"] == name
        for key in ("top1", "top5"):
            assert 0 <= float(row[key]) <= 100
            assert float(row[key]) + float(row[f"{key}_err"]) == pytest.approx(100)
        assert float(row["crop_pct"]) == cfg.get("test_crop_pct", cfg["crop_pct"])
        assert int(row["img_size"]) == cfg.get("test_input_size", cfg["input_size"])[-1]
        assert row["interpolation"] == cfg["interpolation"]
        assert float(row["param_count"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
