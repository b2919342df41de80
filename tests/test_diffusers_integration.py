"""vqz as a diffusers quantization backend, and quantized diffusers models at run time: the checks
diffusers applies to its own backends (footprint, finite outputs, save/load, compile, offloading)
on tiny real denoisers, plus the dtype guard."""
import copy
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import vqz  # noqa: E402
import vqz.integrations  # noqa: E402  (registers vqz with diffusers)
from vqz.api import quant_state  # noqa: E402
from vqz.guard import guard_dtype  # noqa: E402
from vqz.integrations import diffusers as backend  # noqa: E402
from vqz.integrations.diffusers import VQZConfig, enable_save_pretrained  # noqa: E402
from vqz.integrations.diffusers import from_single_file  # noqa: E402
from vqz.io import read_metadata  # noqa: E402
from vqz.nn.linear import QuantLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _quantized_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]


@pytest.fixture(scope="module")
def pixart_folder(tiny_denoisers, tmp_path_factory):
    """A full-precision PixArt transformer saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("pixart") / "fp"
    tiny_denoisers.pixart().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bucketed_dit(tiny_denoisers):
    """A DiT calibrated with static activation scales per timestep range (4 ranges)."""
    model = tiny_denoisers.dit()
    calib = [tiny_denoisers.dit_inputs(100 + i) for i in range(8)]
    return guard_dtype(vqz.quantize(model, "w8a8-static", calib=calib, timestep_buckets=4))


def _dit_steps(tiny_denoisers, model) -> list[dict]:
    """DiT inputs at timesteps that fall into at least 3 of the model's 4 timestep ranges."""
    edges = model.transformer_blocks[0].attn1.to_q.act_quantizer.edges
    steps = [20, 300, 600, 950]
    assert len({int(torch.searchsorted(edges, float(t))) for t in steps}) >= 3
    inputs = [tiny_denoisers.dit_inputs(s) for s in range(len(steps))]
    for x, t in zip(inputs, steps):
        x["timestep"] = torch.full_like(x["timestep"], t)
    return inputs


# ---- the config and the registration --------------------------------------------------------

def test_config_refuses_presets_that_need_calibration():
    for preset, overrides in [("w4a4-svd", {}), ("w8a8-static", {}), ("w8a8", {"smooth": True})]:
        with pytest.raises(ValueError, match="calibration") as e:
            VQZConfig(preset, **overrides)
        assert "w8a8" in str(e.value) and "w4a16" in str(e.value) and "calib=" in str(e.value)
    with pytest.raises(ValueError, match="unknown preset"):
        VQZConfig("w3a3")
    with pytest.raises(ValueError, match="override"):
        VQZConfig("w8a8", groupsize=32)
    assert backend.calibration_free_presets() == ["w8a8", "fp8", "w4a8", "w4a4", "w4a16"]


def test_config_dict_round_trip():
    config = VQZConfig("w4a8", group_size=32)
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored == {"quant_method": "vqz", "preset": "w4a8", "overrides": {"group_size": 32}}
    again = VQZConfig.from_dict(stored)
    assert again == config and again.quant_method == "vqz" and again != VQZConfig("w4a8")
    # a saved model's config describes a finished quantization: calibrated recipes load
    assert VQZConfig.from_dict({"quant_method": "vqz", "preset": "w4a4-svd"}).preset == "w4a4-svd"
    assert "w4a8" in repr(config)


def test_registered_in_diffusers_registries():
    from diffusers import PipelineQuantizationConfig
    from diffusers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                           DiffusersAutoQuantizer)

    assert AUTO_QUANTIZER_MAPPING["vqz"] is backend.VQZQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["vqz"] is VQZConfig
    quantizer = DiffusersAutoQuantizer.from_config({"quant_method": "vqz", "preset": "w8a8"},
                                                   pre_quantized=True)
    assert isinstance(quantizer, backend.VQZQuantizer) and quantizer.is_compileable
    PipelineQuantizationConfig(quant_mapping={"transformer": VQZConfig("w4a16")})  # validates


def test_registration_waits_for_diffusers_and_skips_without_it(monkeypatch):
    code = ("import sys, vqz.integrations\n"
            "assert 'diffusers' not in sys.modules\n"
            "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m\n"
            "assert m['vqz'].__name__ == 'VQZQuantizer'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr

    # as if diffusers' registry were not loaded yet: install waits for it ...
    monkeypatch.delitem(sys.modules, vqz.integrations.DIFFUSERS_REGISTRY)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    finders = list(sys.meta_path)
    vqz.integrations.install()
    assert isinstance(sys.meta_path[0], vqz.integrations._AfterImport)
    # ... and without diffusers installed, does nothing
    sys.meta_path[:] = finders
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    vqz.integrations.install()
    assert sys.meta_path == finders


def test_registration_names_the_diffusers_version_when_registries_moved(monkeypatch):
    import diffusers.quantizers.auto as auto

    monkeypatch.delattr(auto, "AUTO_QUANTIZER_MAPPING")
    version = importlib.metadata.version("diffusers")
    with pytest.raises(ImportError, match=f"diffusers {version}.*AUTO_QUANTIZER_MAPPING"):
        backend.register()


# ---- save_pretrained / from_pretrained -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_at_load_and_save_pretrained_round_trip(tiny_denoisers, pixart_folder, tmp_path,
                                                         dtype):
    from diffusers import PixArtTransformer2DModel

    inputs = {k: v.to(dtype) if torch.is_floating_point(v) else v
              for k, v in tiny_denoisers.pixart_inputs(1).items() if torch.is_tensor(v)}
    inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    model = PixArtTransformer2DModel.from_pretrained(pixart_folder, torch_dtype=dtype,
                                                     quantization_config=VQZConfig("w4a8"))
    assert _quantized_layers(model) and model.hf_quantizer.pre_quantized is False
    expected = PixArtTransformer2DModel.from_pretrained(pixart_folder, torch_dtype=dtype)
    vqz.quantize(expected, "w4a8")
    out = _out(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, _out(expected, inputs))  # the same model as vqz.quantize after loading

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "vqz", "preset": "w4a8", "overrides": {}}
    metadata = read_metadata(tmp_path / "diffusion_pytorch_model.safetensors")
    assert json.loads(metadata["config"])["name"] == "w4a8"
    assert metadata["fingerprint"] == quant_state(model).fingerprint

    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
    assert loaded.hf_quantizer.pre_quantized
    assert _quantized_layers(loaded) == _quantized_layers(model)
    assert vqz.summary(loaded) == vqz.summary(model)
    assert torch.equal(_out(loaded, inputs), out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == v.dtype, k


def test_calibrated_model_round_trip(tiny_denoisers, bucketed_dit, tmp_path):
    from diffusers import DiTTransformer2DModel

    model = enable_save_pretrained(copy.deepcopy(bucketed_dit))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["preset"] == "w8a8-static"
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.transformer_blocks[0].attn1.to_q.act_quantizer.edges.tolist() == \
        bucketed_dit.transformer_blocks[0].attn1.to_q.act_quantizer.edges.tolist()
    for x in _dit_steps(tiny_denoisers, loaded):
        assert torch.equal(_out(loaded, x), _out(bucketed_dit, x))


def test_single_file_checkpoint(tiny_denoisers, pixart_folder, tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = vqz.quantize(tiny_denoisers.pixart(), "w4a16")
    path = vqz.save(model, tmp_path / "pixart.safetensors")
    metadata = read_metadata(path)
    assert json.loads(metadata["config"])["name"] == "w4a16"
    layers = [d["name"] for d in json.loads(metadata["layers"])]
    assert layers == [p.name for p in quant_state(model).plan.layers]
    assert metadata["architecture"] == "PixArtTransformer2DModel"
    inputs = tiny_denoisers.pixart_inputs(2)
    for config in (dict(model.config), pixart_folder):
        loaded = from_single_file(PixArtTransformer2DModel, path, config=config)
        assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    loaded.save_pretrained(tmp_path / "folder")  # a single file's model saves the diffusers way too
    again = PixArtTransformer2DModel.from_pretrained(tmp_path / "folder")
    assert torch.equal(_out(again, inputs), _out(model, inputs))


def test_saved_model_refuses_what_it_cannot_load(tiny_denoisers, pixart_folder, tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = enable_save_pretrained(vqz.quantize(tiny_denoisers.pixart(), "w8a8"))
    with pytest.raises(ValueError, match="safe_serialization=True"):
        model.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    with pytest.raises(ValueError, match="shards"):
        PixArtTransformer2DModel.from_pretrained(tmp_path / "sharded")
    model.save_pretrained(tmp_path / "one")
    spread = {"pos_embed": "cpu", "": "disk"}
    for folder, config in [(tmp_path / "one", None), (pixart_folder, VQZConfig())]:
        with pytest.raises(ValueError, match="one device"):
            PixArtTransformer2DModel.from_pretrained(folder, device_map=spread,
                                                     quantization_config=config)


def test_pipeline_quantization_config_and_model_cpu_offload(tiny_sd_pipe, tmp_path):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, StableDiffusionPipeline

    tiny_sd_pipe.save_pretrained(tmp_path / "fp")
    config = PipelineQuantizationConfig(quant_mapping={"unet": VQZConfig("w8a8")})
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert _quantized_layers(pipe.unet) and not _quantized_layers(pipe.text_encoder)

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p("a red car", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images

    images = run(pipe)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path / "q")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert torch.equal(run(loaded), images)
    loaded.enable_model_cpu_offload(device="cpu")  # accelerate's hooks move the quantized UNet
    assert torch.equal(run(loaded), images)


# ---- run time ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
def test_memory_footprint(tiny_denoisers, preset):
    full = tiny_denoisers.pixart()
    model = vqz.quantize(copy.deepcopy(full), preset)
    bits = {"w8a8": 8, "w4a16": 4}[preset]

    def size(m):
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))

    layers = quant_state(model).plan.layers
    assert len(layers) >= 12
    for p in layers:
        before, after = full.get_submodule(p.name), model.get_submodule(p.name)
        # codes at `bits` per weight; per-channel or per-group float32 scales and the bias add
        # about 2 / K of the float32 layer
        assert bits / 32 <= size(after) / size(before) <= bits / 32 + 3 / before.in_features, p.name
    # nothing else grew: no hidden copies of the full-precision weights
    swapped = sum(size(full.get_submodule(p.name)) - size(model.get_submodule(p.name))
                  for p in layers)
    assert model.get_memory_footprint() == full.get_memory_footprint() - swapped
    assert model.get_memory_footprint() < 0.75 * full.get_memory_footprint()


@pytest.mark.parametrize("case", ["dit-timestep-ranges", "pixart-fp8-at-load"])
def test_compile_fullgraph_without_recompiles(tiny_denoisers, bucketed_dit, pixart_folder, case):
    from diffusers import PixArtTransformer2DModel
    from torch._dynamo.utils import counters

    if case == "dit-timestep-ranges":
        model, steps = bucketed_dit, _dit_steps(tiny_denoisers, bucketed_dit)
    else:
        model = PixArtTransformer2DModel.from_pretrained(pixart_folder,
                                                         quantization_config=VQZConfig("fp8"))
        steps = [tiny_denoisers.pixart_inputs(s) for s in range(4)]
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in steps:
            assert torch.equal(_out(compiled, x), _out(model, x))
    assert not counters["graph_break"]
    # one graph for the forward, and with timestep ranges one for the hook reading the timestep
    assert counters["stats"]["unique_graphs"] <= (2 if case == "dit-timestep-ranges" else 1)
    torch.compiler.reset()


def test_group_offload_through_disk(tiny_denoisers, tmp_path):
    from diffusers.hooks import apply_group_offloading
    from safetensors import safe_open

    model = guard_dtype(vqz.quantize(tiny_denoisers.flux(), "w4a4"))
    inputs = tiny_denoisers.flux_inputs(3)
    expected = _out(model, inputs)
    for kind, extra in [("block_level", {"num_blocks_per_group": 1}), ("leaf_level", {})]:
        folder = tmp_path / kind
        offloaded = copy.deepcopy(model)
        # onload to the CPU as well: every group's tensors are emptied after use and read back
        # from disk, so the quantized layers' integer codes and float32 scales make the trip
        apply_group_offloading(offloaded, onload_device=torch.device("cpu"), offload_type=kind,
                               offload_to_disk_path=str(folder), **extra)
        assert torch.equal(_out(offloaded, inputs), expected)
        assert torch.equal(_out(offloaded, inputs), expected)
        stored = set()
        for file in folder.iterdir():
            with safe_open(str(file), "pt") as f:
                stored |= {f.get_tensor(k).dtype for k in f.keys()}
        assert {torch.uint8, torch.float32} <= stored


def test_dtype_conversions_are_refused_and_change_nothing(tiny_denoisers):
    model = guard_dtype(vqz.quantize(tiny_denoisers.flux(), "w4a8"))
    inputs = tiny_denoisers.flux_inputs(4)
    expected = _out(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    conversions = [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.float(),
                   lambda m: m.double(), lambda m: m.to(torch.float16),
                   lambda m: m.to("cpu", torch.bfloat16), lambda m: m.to(dtype=torch.float32),
                   lambda m: m.type(torch.float16)]
    for convert in conversions:
        with pytest.raises(TypeError, match="quantized by vqz"):
            convert(model)
        assert all(torch.equal(model.state_dict()[k], v) and model.state_dict()[k].dtype == v.dtype
                   for k, v in state.items())
    with pytest.raises(TypeError, match=r"\.to\(device\)"):
        model.bfloat16()
    assert model.to("cpu") is model and model.cpu() is model
    assert torch.equal(_out(model, inputs), expected)

    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for copied in (twin, unpickled):
        assert torch.equal(_out(copied, inputs), expected)
        with pytest.raises(TypeError):
            copied.half()
        assert copied._apply.module is copied  # its guard converts the copy, not the original


def test_models_loaded_through_the_backend_are_guarded(pixart_folder):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(pixart_folder,
                                                     quantization_config=VQZConfig("w8a8"))
    with pytest.raises(TypeError, match="vqz"):
        model.bfloat16()  # diffusers' own check covers .to(dtype), .half() and .float() only
    assert model.transformer_blocks[0].attn1.to_q.qweight.scale.dtype == torch.float32


# ---- on a GPU (the vqz kernels run there, so outputs are compared within diffusers' tolerance) --

def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@cuda
def test_model_cpu_offload_on_gpu(tiny_sd_pipe, tmp_path):
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline

    tiny_sd_pipe.save_pretrained(tmp_path)
    config = PipelineQuantizationConfig(quant_mapping={"unet": VQZConfig("w8a8")})

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p("a red car", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images.cpu()

    expected = run(StableDiffusionPipeline.from_pretrained(tmp_path, quantization_config=config)
                   .to("cuda"))
    offloaded = StableDiffusionPipeline.from_pretrained(tmp_path, quantization_config=config)
    offloaded.enable_model_cpu_offload()
    assert torch.isfinite(expected).all()
    _close(run(offloaded), expected)
    assert offloaded.unet.device.type == "cpu"  # back on the CPU after the call


@cuda
@pytest.mark.parametrize("use_stream", [False, True])
def test_group_offload_on_gpu(tiny_denoisers, use_stream):
    model = guard_dtype(vqz.quantize(tiny_denoisers.flux(), "w4a4"))
    inputs = {k: v.cuda() for k, v in tiny_denoisers.flux_inputs(3).items()}
    expected = _out(copy.deepcopy(model).to("cuda"), inputs)
    model.enable_group_offload(torch.device("cuda"), offload_type="leaf_level",
                               use_stream=use_stream)
    for _ in range(2):
        _close(_out(model, inputs), expected)


@cuda
def test_compile_on_gpu_with_inductor(tiny_denoisers, bucketed_dit):
    from torch._dynamo.utils import counters
    from vqz.kernels import prepare_model

    model = copy.deepcopy(bucketed_dit).to("cuda")
    prepare_model(model)  # the kernels' runtime tensors exist before tracing, as they must
    steps = [{k: v.cuda() for k, v in x.items()} for x in _dit_steps(tiny_denoisers, model)]
    expected = [_out(model, x) for x in steps]
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in zip(steps, expected):
            _close(_out(compiled, x), y)
    assert not counters["graph_break"]
    torch.compiler.reset()
