import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import vqz


def _quantized(model, preset, calib=None):
    return vqz.quantize(copy.deepcopy(model), preset, calib=calib)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset", ["w8a8-static", "w4a4-svd", "nvfp4-svd", "fp8", "w4a16"])
def test_round_trip_is_bit_exact(convnet, tmp_path, preset):
    calib = [torch.rand(2, 3, 12, 12) for _ in range(2)]
    q = _quantized(convnet, preset, calib)
    file = vqz.save(q, tmp_path / "q.safetensors")
    skeleton = copy.deepcopy(convnet)
    vqz.load(skeleton, file)
    _assert_same_state(q, skeleton)
    x = torch.rand(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(q(x), skeleton(x))
    assert [r["name"] for r in vqz.summary(skeleton)] == [r["name"] for r in vqz.summary(q)]


def test_load_into_meta_skeleton(mlp, tmp_path):
    q = _quantized(mlp, "w4a4-svd", [torch.randn(8, 128)])
    vqz.save(q, tmp_path)  # a directory gets model.safetensors
    with torch.device("meta"):
        skeleton = type(mlp)()
    vqz.load(skeleton, tmp_path)
    assert all(t.device.type == "cpu" for t in skeleton.state_dict().values())
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(q(x), skeleton(x))


def test_4bit_codes_are_stored_packed_row_major(mlp, tmp_path):
    q = _quantized(mlp, "w4a16")
    file = vqz.save(q, tmp_path / "q.safetensors")
    with safe_open(str(file), "pt") as f:
        codes = f.get_tensor("fc1.qweight.codes")
        meta = f.metadata()
    assert codes.dtype == torch.uint8 and codes.shape == (512, 64)  # [N, K/2]
    assert json.loads(meta["config"])["name"] == "w4a16"
    assert meta["vqz_format_version"] == "1"


def test_tied_weights_save(tmp_path):
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    vqz.quantize(model, "w8a8")
    skeleton = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    skeleton[2] = skeleton[0]
    vqz.load(skeleton, vqz.save(model, tmp_path / "t.safetensors"))
    _assert_same_state(model, skeleton)


def test_other_architecture_is_refused_untouched(mlp, tmp_path, guard):
    file = vqz.save(_quantized(mlp, "w8a8"), tmp_path / "q.safetensors")
    other = nn.Sequential(nn.Linear(128, 64))
    check = guard(other)
    with pytest.raises(ValueError, match="MLP.*Sequential"):
        vqz.load(other, file)
    check()
    wider = type(mlp)(hidden=256)
    with pytest.raises(ValueError, match="architecture"):
        vqz.load(wider, file)


def test_newer_format_version_is_refused(mlp, tmp_path):
    file = vqz.save(_quantized(mlp, "w8a8"), tmp_path / "q.safetensors")
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["vqz_format_version"] = "99"
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(ValueError, match="newer.*upgrade"):
        vqz.load(copy.deepcopy(mlp), file)


def test_damaged_file_leaves_skeleton_untouched(mlp, tmp_path, guard):
    file = vqz.save(_quantized(mlp, "w8a8"), tmp_path / "q.safetensors")
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    del tensors["fc2.bias"]
    save_file(tensors, str(file), metadata=meta)
    skeleton = copy.deepcopy(mlp)
    check = guard(skeleton)
    with pytest.raises(ValueError, match="fc2.bias"):
        vqz.load(skeleton, file)
    check()


def test_not_a_vqz_file_and_missing_file(mlp, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="not a vqz checkpoint"):
        vqz.load(copy.deepcopy(mlp), plain)
    with pytest.raises(FileNotFoundError):
        vqz.load(copy.deepcopy(mlp), tmp_path / "nothing.safetensors")


def test_save_needs_a_quantized_model(mlp, tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        vqz.save(mlp, tmp_path / "x.safetensors")


def test_meta_skeleton_missing_computed_buffers_is_refused(tmp_path):
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("table", torch.arange(8.0), persistent=False)

        def forward(self, x):
            return self.fc(x) + self.table
    file = vqz.save(vqz.quantize(WithTable(), "w8a8"), tmp_path / "q.safetensors")
    with torch.device("meta"):
        skeleton = WithTable()
    with pytest.raises(ValueError, match="init_empty_weights"):
        vqz.load(skeleton, file)
    assert isinstance(skeleton.fc, nn.Linear) and getattr(skeleton, "_vqz_state", None) is None
