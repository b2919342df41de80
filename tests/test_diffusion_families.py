"""Family adapters on the real diffusers denoisers, built from tiny configs with random weights."""
import copy
import fnmatch
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import vqz
from vqz.eval.images import sqnr
from vqz.nn import QuantConv2d, QuantLinear, QuantModule
from vqz.patch import FUSED_PROJECTIONS
from vqz.pipelines import adapter_for

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

# tiny model (tests/tiny_denoisers.py) -> the diffusers class, which is also its adapter's name
FAMILIES = {
    "sd15_unet": "UNet2DConditionModel", "sdxl_unet": "UNet2DConditionModel",
    "unet2d": "UNet2DModel", "dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel",
    "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
    "flux2": "Flux2Transformer2DModel", "sana": "SanaTransformer2DModel",
    "qwen_image": "QwenImageTransformer2DModel", "cogvideox": "CogVideoXTransformer3DModel",
    "wan": "WanTransformer3DModel",
}
UNETS = ["sd15_unet", "sdxl_unet", "unet2d"]
PRESETS = ["w8a8", "w4a8", "w4a4-svd"]
# rule patterns for modules that only some configs of the class have (none of the tiny ones)
OPTIONAL = {"class_embedding*", "encoder_hid_proj*", "ofs_embedding.*",
            "condition_embedder.image_embedder.*"}
ATTENTION = re.compile(r"\.(to_[qkv]|to_out(\.0)?|add_[qkv]_proj|to_add_out|to_qkv_mlp_proj)$")


@pytest.fixture(scope="module")
def zoo(tiny_denoisers):
    """zoo(name) -> (full-precision model, inputs, its output); zoo(name, preset) -> quantized copy.
    Built once per module: tests never modify what they get."""
    cache = {}

    def get(name, preset=None):
        if (name, preset) not in cache:
            build, inputs = tiny_denoisers.FAMILIES[name]
            if preset is None:
                model, x = build(), inputs(0)
                cache[name, None] = model, x, _run(model, x)
            else:
                cache[name, preset] = vqz.quantize(copy.deepcopy(get(name)[0]), preset,
                                                   **_overrides(name, preset, inputs))
        return cache[name, preset]
    return get


def _overrides(name, preset, inputs):
    if preset != "w4a4-svd":
        return {}
    # rank 8: these layers are 32 wide, too narrow for the default rank 32 (no branch at all). The
    # per-layer alpha search runs for one family; the others take alpha=0.5 to keep the module fast.
    search = {} if name == "flux" else {"alpha": 0.5}
    return {"calib": [inputs(1), inputs(2)], "rank": 8, **search}


@torch.no_grad()
def _run(model, x):
    return model(**x, return_dict=False)[0]


def _rules(model):
    return adapter_for(model).default_rules


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_has_its_adapter(zoo, name):
    model = zoo(name)[0]
    adapter = adapter_for(model)
    assert type(model).__name__ == adapter.name == FAMILIES[name]
    assert adapter.default_rules and set(adapter.notes) == {r.pattern for r in adapter.default_rules}
    assert all(r.skip is True for r in adapter.default_rules)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", FAMILIES)
def test_presets_keep_the_output(zoo, name, preset):
    _, x, ref = zoo(name)
    out = _run(zoo(name, preset), x)
    assert torch.isfinite(out).all()
    # w8a8 is near-lossless; the 4-bit floor only rules out a broken model (noise gives <= 0 dB)
    assert sqnr(out, ref) >= (25.0 if preset == "w8a8" else 5.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_exclusions_stay_full_precision(zoo, name):
    model = zoo(name)[0]
    q = zoo(name, "w8a8")
    rules = _rules(model)
    status = {row["name"]: row["status"] for row in vqz.summary(q)}
    excluded = attention = 0
    for layer_name, layer in model.named_modules():
        if type(layer) not in (nn.Linear, nn.Conv2d):
            continue
        now = q.get_submodule(layer_name)
        if any(fnmatch.fnmatchcase(layer_name, r.pattern) for r in rules):
            assert type(now) is type(layer), layer_name
            assert status[layer_name] == "full precision: excluded by a rule", layer_name
            excluded += 1
        else:
            assert isinstance(now, QuantModule), layer_name
            if ATTENTION.search(layer_name):
                assert isinstance(now, QuantLinear), layer_name
                attention += 1
    assert excluded and attention


@pytest.mark.parametrize("cls", sorted(set(FAMILIES.values())))
def test_every_rule_pattern_names_a_real_module(zoo, cls):
    models = [zoo(family)[0] for family, c in FAMILIES.items() if c == cls]
    names = [n for model in models for n, _ in model.named_modules()]
    unused = [r.pattern for r in _rules(models[0])
              if not any(fnmatch.fnmatchcase(n, r.pattern) for n in names)]
    assert set(unused) <= OPTIONAL, unused


def _skip_concat_channels(model, x):
    """{resnet name: hidden channels} for every up-block resnet whose input at run time is
    cat([hidden, skip]) with skip one of the up block's residuals (checked tensor for tensor)."""
    found, residuals, hooks = {}, {}, []

    def on_block(i):
        def hook(module, args, kwargs):
            residuals[i] = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
        return hook

    def on_resnet(i, j):
        def hook(module, args, kwargs):
            x_in = args[0] if args else kwargs["input_tensor"]
            skip = residuals[i][-1 - j]  # the block pops its residuals from the end
            split = x_in.shape[1] - skip.shape[1]
            if split > 0 and torch.equal(x_in[:, split:], skip):
                found[f"up_blocks.{i}.resnets.{j}"] = split
        return hook

    for i, block in enumerate(model.up_blocks):
        hooks.append(block.register_forward_pre_hook(on_block(i), with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            hooks.append(resnet.register_forward_pre_hook(on_resnet(i, j), with_kwargs=True))
    try:
        _run(model, x)
    finally:
        for h in hooks:
            h.remove()
    return found


@pytest.mark.parametrize("builder", UNETS + ["unet2d_no_mid"])
def test_unet_splits_match_the_channels_at_run_time(tiny_denoisers, builder):
    build, inputs = tiny_denoisers.UNETS[builder]
    model = build()
    runtime = _skip_concat_channels(model, inputs(3))
    assert len(runtime) == sum(len(b.resnets) for b in model.up_blocks)  # all of them concatenate
    expected = {}
    for resnet_name, split in runtime.items():
        for conv in ("conv1", "conv_shortcut"):
            if isinstance(getattr(model.get_submodule(resnet_name), conv), nn.Conv2d):
                expected[f"{resnet_name}.{conv}"] = (split,)
    assert adapter_for(model).splits(model) == expected


@pytest.mark.parametrize("name", UNETS)
def test_unet_skip_convs_get_one_quantizer_per_half(zoo, name):
    model, x, _ = zoo(name)
    q = zoo(name, "w8a8")
    runtime = _skip_concat_channels(model, x)
    consumers = {f"{r}.{conv}" for r in runtime for conv in ("conv1", "conv_shortcut")
                 if isinstance(getattr(model.get_submodule(r), conv), nn.Conv2d)}
    split = {n for n, m in q.named_modules()
             if isinstance(m, QuantConv2d) and len(m.input_quantizers) == 2}
    assert split == consumers
    for conv_name in consumers:
        layer = q.get_submodule(conv_name)
        hidden = runtime[conv_name.rsplit(".", 1)[0]]
        assert layer.ranges == [(0, hidden), (hidden, layer.in_channels)]


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_is_exact(zoo, tiny_denoisers, tmp_path, name):
    accelerate = pytest.importorskip("accelerate")
    q = zoo(name, "w4a4-svd")
    x = tiny_denoisers.FAMILIES[name][1](5)
    vqz.save(q, tmp_path / "q.safetensors")
    # init_empty_weights puts parameters on the meta device but keeps the buffers a model computes
    # itself (sin-cos position tables, RoPE frequencies), which no checkpoint holds.
    with accelerate.init_empty_weights():
        skeleton = tiny_denoisers.FAMILIES[name][0]()
    vqz.load(skeleton, tmp_path / "q.safetensors")
    assert torch.equal(_run(skeleton, x), _run(q, x))


@pytest.mark.parametrize("name", ["flux", "pixart"])
def test_fused_projections_are_quantized_in_place_of_the_separate_ones(zoo, tiny_denoisers,
                                                                      tmp_path, name):
    """After diffusers' fuse_qkv_projections() the attention calls to_qkv (and to_added_qkv), not
    the separate projections it keeps: those are reported superseded and stay unquantized."""
    accelerate = pytest.importorskip("accelerate")
    build, inputs = tiny_denoisers.FAMILIES[name]
    model = copy.deepcopy(zoo(name)[0])
    model.fuse_qkv_projections()
    ref = _run(model, inputs(0))
    q = vqz.quantize(model, "w4a4-svd", **_overrides(name, "w4a4-svd", inputs))
    status = {row["name"]: row["status"] for row in vqz.summary(q)}
    fused = [n for n in status if n.rpartition(".")[2] in FUSED_PROJECTIONS]
    assert fused and all(isinstance(q.get_submodule(n), QuantLinear) for n in fused)
    for n in fused:
        attn, _, kind = n.rpartition(".")
        for part in FUSED_PROJECTIONS[kind]:
            assert type(q.get_submodule(f"{attn}.{part}")) is nn.Linear
            assert "superseded" in status[f"{attn}.{part}"], status[f"{attn}.{part}"]
    assert sqnr(_run(q, inputs(0)), ref) >= 5.0
    vqz.save(q, tmp_path / "q.safetensors")
    with accelerate.init_empty_weights():
        skeleton = build()
    skeleton.fuse_qkv_projections()
    vqz.load(skeleton, tmp_path / "q.safetensors")
    assert torch.equal(_run(skeleton, inputs(5)), _run(q, inputs(5)))


def test_other_models_use_the_generic_adapter(convnet):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for model, run in ((vae, lambda m: m(x).sample), (convnet, lambda m: m(x))):
        assert adapter_for(model).name == "generic"
        with torch.no_grad():
            ref = run(model)
            q = vqz.quantize(copy.deepcopy(model), "w8a8")
            assert sqnr(run(q), ref) >= 25.0
        assert not any(row["status"] == "full precision: excluded by a rule" for row in vqz.summary(q))


def test_vqz_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import vqz, vqz.pipelines.diffusion\n"
            "from vqz.pipelines import adapter_for\n"
            "import torch; assert adapter_for(torch.nn.Linear(2, 2)).name == 'generic'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
