import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from timm.data import resolve_data_config  # noqa: E402

from vqz.pipelines import reference_vit  # noqa: E402
from vqz.pipelines.reference_vit import (CIFAR10_MEAN, CIFAR10_STD, build_vit, cifar10_split,  # noqa: E402
                                         load_reference_vit, top1)

ROOT = Path(__file__).resolve().parents[1]


def tiny_npz(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    return path


@torch.no_grad()
def test_build_vit_gives_finite_logits():
    torch.manual_seed(0)
    logits = build_vit().eval()(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_timm_data_config_is_cifar():
    config = resolve_data_config(model=build_vit())
    assert config["input_size"] == (3, 32, 32)
    assert config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == CIFAR10_MEAN and tuple(config["std"]) == CIFAR10_STD


def test_cifar10_split_is_fixed_and_stratified(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    train_x, train_y, held_x, held_y = cifar10_split(data, held_out=10)
    assert train_x.shape == (30, 3, 32, 32) and held_x.shape == (10, 3, 32, 32)
    assert train_x.dtype == torch.uint8 and held_y.dtype == torch.int64
    assert sorted(held_y.tolist()) == list(range(10))  # one of each class
    raw = np.load(data)["x"]
    assert torch.equal(held_x[0], torch.from_numpy(raw[30]).permute(2, 0, 1))  # the last of class 0
    assert torch.equal(held_x, cifar10_split(data, held_out=10)[2])


def test_training_smoke_run_saves_loadable_weights(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "reference"
    subprocess.run([sys.executable, str(ROOT / "samples" / "train_vit.py"), "--out", str(out),
                    "--data", str(data), "--steps", "2", "--batch-size", "4", "--held-out", "10"],
                   check=True, cwd=tmp_path, timeout=120)
    folder = out / "vit"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["held_out_top1"] <= 1 and metrics["steps"] == 2
    assert json.loads((folder / "config.json").read_text())["embed_dim"] == reference_vit.VIT_CONFIG["embed_dim"]
    assert sum(f.stat().st_size for f in folder.iterdir()) < 15 * 2**20
    model = load_reference_vit(root=out)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    held_x, held_y = cifar10_split(data, held_out=10)[2:]
    assert top1(model, held_x, held_y) == metrics["held_out_top1"]


def test_load_reference_vit_explains_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(reference_vit, "reference_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="samples/train_vit.py --out samples/reference"):
        load_reference_vit()


def test_committed_weights_load():
    if not (reference_vit.reference_dir() / "vit" / reference_vit.WEIGHTS_NAME).is_file():
        pytest.skip("no committed weights for the ViT yet (samples/train_vit.py makes them)")
    model = load_reference_vit()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
