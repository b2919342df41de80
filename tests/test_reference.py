import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from vqz.pipelines import reference  # noqa: E402
from vqz.pipelines.reference import build_dit, build_unet, load_reference, sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Narrow and shallow versions of the reference configs keep the sampler tests fast.
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32}
TINY_UNET = {"block_out_channels": (32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}


@torch.no_grad()
def test_reference_configs_give_finite_noise_predictions():
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 10])
    dit_out = build_dit().eval()(x, t, torch.tensor([3, reference.NULL_CLASS])).sample
    unet_out = build_unet().eval()(x, t).sample
    for out in (dit_out, unet_out):
        assert out.shape == x.shape
        assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("build, config", [(build_dit, TINY_DIT), (build_unet, TINY_UNET)])
def test_sample_is_seeded(build, config):
    torch.manual_seed(0)
    model = build(config).eval()
    a = sample(model, n=3, seed=1, steps=3)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.01
    assert torch.equal(a, sample(model, n=3, seed=1, steps=3))
    assert (a - sample(model, n=3, seed=2, steps=3)).abs().mean() > 0.01


def test_dit_guidance_and_labels_change_samples():
    torch.manual_seed(0)
    model = build_dit(TINY_DIT).eval()
    base = sample(model, n=2, seed=0, steps=2)
    assert not torch.equal(base, sample(model, n=2, seed=0, steps=2, guidance=1.0))
    assert not torch.equal(base, sample(model, n=2, seed=0, steps=2, class_labels=[7, 7]))
    with pytest.raises(ValueError, match="expected"):
        sample(model, n=2, seed=0, class_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="unconditional"):
        sample(build_unet(TINY_UNET), n=2, seed=0, class_labels=[1, 2])


def test_training_smoke_run_saves_loadable_weights(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 16))
    out = tmp_path / "reference"
    subprocess.run([sys.executable, str(ROOT / "samples" / "train_reference.py"), "--model", "dit",
                    "--out", str(out), "--data", str(data), "--steps", "3", "--batch-size", "4",
                    "--sample-steps", "1"], check=True, cwd=tmp_path, timeout=300)
    assert (out / "dit" / "samples.png").is_file()
    model = load_reference("dit", root=out)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert sum(f.stat().st_size for f in (out / "dit").iterdir()) < 20 * 2**20


def test_load_reference_explains_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "reference_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="samples/train_reference.py --model unet"):
        load_reference("unet")
    with pytest.raises(ValueError, match="unknown reference model"):
        load_reference("vit")


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_committed_weights_load(name):
    if not (reference.reference_dir() / name / reference.WEIGHTS_NAME).is_file():
        pytest.skip(f"no committed weights for {name} yet (samples/train_reference.py makes them)")
    model = load_reference(name)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    images = sample(model, n=2, seed=0, steps=2)
    assert torch.isfinite(images).all() and images.std() > 0.01
