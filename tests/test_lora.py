"""LoRA on quantized models (vqz.lora): exact at the layer level against y + s x Aᵀ Bᵀ, close to the
merged full-precision model at the model level, adapters that compose, change strength and come
off bit-exactly, the key formats users meet, the kernels' rank rules and every refusal."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vqz
import vqz.lora as lora
from vqz.eval.images import sqnr
from vqz.kernels import kernel_kind, prepare_model, runtime
from vqz.kernels.runtime import MAX_RANK, RANK_MULTIPLE
from vqz.nn import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

DIT_TARGETS = [f"transformer_blocks.{i}.attn1.{p}" for i in (0, 1)
               for p in ("to_q", "to_k", "to_v", "to_out.0")]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()


def _quantized(preset="w4a4-svd", **overrides):
    """The 64 -> 128 -> 64 net quantized; w4a4-svd: smoothing + a rank-16 branch."""
    if preset == "w4a4-svd":
        overrides = {"rank": 16, **overrides}
    calib = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return vqz.quantize(_net(), preset, calib=calib, **overrides)


def _factors(seed, k, n, r=4):
    """Random A [r, K], B [N, r] whose product is as large as the layer's weight."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g) * 0.2, torch.randn(n, r, generator=g) * 0.25


def _diffusers_keys(factors: dict, prefix="") -> dict:
    """{module: (A, B)} as diffusers/PEFT keys."""
    return {f"{prefix}{name}.lora_{ab}.weight": t for name, (a, b) in factors.items()
            for ab, t in (("A", a), ("B", b))}


def _delta(x, a, b, scale):
    """scale x Aᵀ Bᵀ: what the LoRA adds to the layer's output."""
    return scale * (x @ a.T) @ b.T


def _snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    return state, modules


def _assert_unchanged(model, snapshot):
    state, modules = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert lora.list_loras(model) == {}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ------------------------------------------------------------------------------------- layer level

@pytest.mark.parametrize("preset", ["w4a4-svd", "w4a8"])
@torch.no_grad()
def test_layer_output_gains_exactly_the_lora_term(preset):
    model = _quantized(preset)
    layer = model[0]
    if preset == "w4a4-svd":  # λ and a branch: the LoRA must act on x, not on x / λ
        assert layer.rank == 16 and (layer.smooth - 1).abs().max() > 0.1
    else:
        assert layer.lora_down is None
    x = torch.randn(5, 3, 64)
    before = layer(x)
    a, b = _factors(1, 64, 128)
    lora.load_lora(model, _diffusers_keys({"0": (a, b)}), "style", scale=0.7)
    _close(layer(x), before + _delta(x, a, b, 0.7))
    assert lora.list_loras(model) == {"style": lora.LoraInfo(0.7, {"0": 4})}


@torch.no_grad()
def test_full_precision_linear_is_wrapped_and_given_back():
    model = _quantized(exclude=["2"])
    original = model[2]
    x = torch.randn(5, 128)
    before = original(x)
    a, b = _factors(2, 128, 64)
    lora.load_lora(model, _diffusers_keys({"2": (a, b)}), "style", scale=1.5)
    assert isinstance(model[2], QuantLinear) and model[2].weight is original.weight
    _close(model[2](x), before + _delta(x, a, b, 1.5))
    lora.remove_lora(model, "style")
    assert model[2] is original


@torch.no_grad()
def test_a_pipeline_gets_the_lora_on_its_denoiser():
    model = _quantized()
    pipe = SimpleNamespace(components={}, transformer=model)  # what vqz takes as a pipeline
    lora.load_lora(pipe, _diffusers_keys({"0": _factors(1, 64, 128)}, "transformer."))
    assert model[0].rank == 32 and list(lora.list_loras(pipe)) == ["default"]


# ------------------------------------------------------------------------------------- model level

@pytest.fixture(scope="module")
def dit(tiny_denoisers):
    """(full-precision tiny DiT, its w4a4-svd quantization, inputs)."""
    fp = tiny_denoisers.dit()
    calib = [tiny_denoisers.dit_inputs(1), tiny_denoisers.dit_inputs(2)]
    q = vqz.quantize(copy.deepcopy(fp), "w4a4-svd", calib=calib, rank=8, alpha=0.5)
    return fp, q, tiny_denoisers.dit_inputs(0)


def _dit_lora(fp, names, seed=3):
    """{module: (A, B)} of rank 4 for `names` of the DiT."""
    return {name: _factors(seed + i, fp.get_submodule(name).in_features,
                           fp.get_submodule(name).out_features) for i, name in enumerate(names)}


@torch.no_grad()
def _run(model, x):
    return model(**x, return_dict=False)[0]


@torch.no_grad()
def test_quantized_model_with_lora_tracks_the_merged_full_precision_model(dit):
    fp, q, x = dit
    q = copy.deepcopy(q)
    # the attention projections are quantized; the adaLN projection stays in full precision
    factors = _dit_lora(fp, DIT_TARGETS + ["transformer_blocks.0.norm1.linear"])
    merged = copy.deepcopy(fp)
    for name, (a, b) in factors.items():
        merged.get_submodule(name).weight += 0.8 * b @ a
    without = sqnr(_run(q, x), _run(merged, x))
    lora.load_lora(q, _diffusers_keys(factors, "transformer."), scale=0.8)
    with_lora = sqnr(_run(q, x), _run(merged, x))
    quantization_only = sqnr(_run(dit[1], x), _run(fp, x))
    # the LoRA costs the quantized model almost nothing against its own full-precision reference,
    # and ignoring it would be far worse
    assert with_lora > quantization_only - 6 and with_lora > without + 15, (with_lora, without)


def _save_folder(path, tensors, file, metadata=None, config=None):
    path.mkdir()
    save_file(tensors, str(path / file), metadata=metadata)
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _branches(model, source, scale=1.0):
    """The LoRA-widened branch tensors of a copy of `model` after loading `source`."""
    model = copy.deepcopy(model)
    lora.load_lora(model, source, scale=scale)
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def _assert_equal(got, want):
    assert set(got) == set(want) and all(torch.equal(v, want[k]) for k, v in got.items())


@torch.no_grad()
def test_key_formats_and_alphas_load_alike(dit, tmp_path):
    """Every format gives the branches bit for bit what the plain dict gives at scale alpha / r."""
    fp, q, _ = dit
    factors = _dit_lora(fp, DIT_TARGETS)
    plain = _diffusers_keys(factors)
    want = _branches(q, plain, scale=0.5)  # alpha 2, rank 4
    kohya, old = {}, {}
    for name, (a, b) in factors.items():
        flat = "lora_transformer_" + name.replace(".", "_")
        kohya |= {f"{flat}.lora_down.weight": a, f"{flat}.lora_up.weight": b, f"{flat}.alpha": 2.0}
        old |= {f"{name}.lora.down.weight": a, f"{name}.lora.up.weight": b}
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2})}
    diffusers_dir = _save_folder(tmp_path / "diffusers", _diffusers_keys(factors, "transformer."),
                                 "pytorch_lora_weights.safetensors", metadata)
    peft = {k.replace(".weight", ".default.weight"): v
            for k, v in _diffusers_keys(factors, "base_model.model.").items()}
    peft_dir = _save_folder(tmp_path / "peft", peft, "adapter_model.safetensors",
                            config={"r": 4, "lora_alpha": 2})
    for source in (kohya, diffusers_dir, peft_dir, peft_dir / "adapter_model.safetensors"):
        _assert_equal(_branches(q, source), want)
    _assert_equal(_branches(q, old, scale=0.5), want)
    # PEFT's alpha_pattern overrides lora_alpha for the modules it matches: alpha 8 for to_q
    (peft_dir / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 2, "alpha_pattern": {"attn1.to_q": 8}}))
    to_q_x4 = {k: v * (4 if ".to_q.lora_B" in k else 1) for k, v in plain.items()}
    _assert_equal(_branches(q, peft_dir), _branches(q, to_q_x4, scale=0.5))


# ------------------------------------------------------------------------- several adapters

@torch.no_grad()
def test_adapters_compose_change_strength_and_come_off_exactly():
    model = _quantized(exclude=["2"])
    base = _snapshot(model)
    x = torch.randn(7, 64)
    before = model[0](x)
    (a1, b1), (a2, b2) = _factors(1, 64, 128, r=4), _factors(2, 64, 128, r=20)
    lora.load_lora(model, _diffusers_keys({"0": (a1, b1), "2": _factors(3, 128, 64)}), "one", 0.7)
    lora.load_lora(model, _diffusers_keys({"0": (a2, b2)}), "two", scale=-1.2)
    loaded = copy.deepcopy(model.state_dict())
    _close(model[0](x), before + _delta(x, a1, b1, 0.7) + _delta(x, a2, b2, -1.2))

    lora.set_lora_scale(model, "one", 0.0)
    _close(model[0](x), before + _delta(x, a2, b2, -1.2))
    lora.set_lora_scale(model, "one", 0.7)  # rewritten from the stored B: bit-exact again
    _assert_equal(model.state_dict(), loaded)
    assert {n: i.scale for n, i in lora.list_loras(model).items()} == {"one": 0.7, "two": -1.2}

    lora.remove_lora(model, "one")  # the first segment: "two" moves up to follow the SVD branch
    only_two = _quantized(exclude=["2"])
    lora.load_lora(only_two, _diffusers_keys({"0": (a2, b2)}), "two", scale=-1.2)
    _assert_equal(model.state_dict(), only_two.state_dict())
    lora.remove_lora(model, "two")
    _assert_unchanged(model, base)
    assert not hasattr(model, lora.LORA_ATTR)


# --------------------------------------------------------------------------------- kernels

@torch.no_grad()
def test_segments_keep_a_kernel_rank_and_the_kernels_run_them():
    # on a GPU runtime.run is the Triton kernels; elsewhere their reference implementations
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _quantized("w4a4-svd-fast", rank=16).to(device)  # runs on the fused int8 kernels
    layer = model[0]
    assert kernel_kind(layer) == "int8"
    prepare_model(model)
    lora.load_lora(model, _diffusers_keys({"0": _factors(1, 64, 128, r=4)}), "one")
    lora.load_lora(model, _diffusers_keys({"0": _factors(2, 64, 128, r=20)}), "two")
    assert layer.rank == 16 + 16 + 32 and layer.rank % RANK_MULTIPLE == 0
    assert not layer.lora_down[:, 20:32].any() and not layer.lora_up[20:32].any()  # padding
    assert layer.kernel_l1.shape == (64, 64)  # the kernels' copy follows the branch
    x = torch.randn(5, 64, device=device)
    want = layer.reference_forward(x)
    tol = 2e-3 if device == "cuda" else 1e-5  # on GPU the branch runs on TF32 tensor cores
    torch.testing.assert_close(runtime.run(layer, x), want, rtol=tol, atol=tol * want.abs().max().item())
    lora.remove_lora(model, "one")
    assert layer.rank == 48 and layer.kernel_l1.shape == (64, 48)


@torch.no_grad()
def test_a_branch_beyond_the_kernel_limit_is_refused_before_any_change():
    model = _quantized("w4a4-svd-fast", rank=16)
    lora.load_lora(model, _diffusers_keys({"0": _factors(1, 64, 128, r=MAX_RANK - 16)}), "big")
    assert model[0].rank == MAX_RANK  # the limit itself is fine
    before = _snapshot(model)
    # layer "2" comes first and is valid: nothing may be applied to it either
    too_wide = _diffusers_keys({"2": _factors(2, 128, 64), "0": _factors(3, 64, 128, r=1)})
    with pytest.raises(ValueError, match=rf"'0'.* rank {MAX_RANK} to {MAX_RANK + 16}, above the {MAX_RANK}"):
        lora.load_lora(model, too_wide, "more")
    _assert_equal(model.state_dict(), before[0])
    assert list(lora.list_loras(model)) == ["big"] and model[0].rank == MAX_RANK


@torch.no_grad()
def test_fp8_layers_with_a_lora_leave_the_fp8_kernel_which_has_no_branch():
    model = _quantized("fp8")
    assert kernel_kind(model[0]) == "fp8"
    lora.load_lora(model, _diffusers_keys({"0": _factors(1, 64, 128)}))
    assert kernel_kind(model[0]) is None
    lora.remove_lora(model, "default")
    assert kernel_kind(model[0]) == "fp8"


# ------------------------------------------------------------------------------ saving

def test_save_refuses_a_model_with_adapters(tmp_path):
    model = _quantized()
    lora.load_lora(model, _diffusers_keys({"0": _factors(1, 64, 128)}), "style")
    with pytest.raises(ValueError, match=r"\['style'\].*remove_lora"):
        vqz.save(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    lora.remove_lora(model, "style")
    vqz.save(model, tmp_path / "q")


# ------------------------------------------------------------------------------ refusals

def _good0():
    return _diffusers_keys({"0": _factors(1, 64, 128)})


def _written(path, data: bytes | None = None):
    """`path` holding `data`, or an empty safetensors file."""
    if data is None:
        save_file({}, str(path))
    else:
        path.write_bytes(data)
    return path


# name -> (source from a temporary folder, the message expected)
BAD = {
    "another architecture": (
        lambda tmp: {**_good0(), **_diffusers_keys({"transformer_blocks.0.attn1.to_q": _factors(2, 32, 32)})},
        r"1 of the 2 modules .* match no module of Sequential: \['transformer_blocks.0.attn1.to_q'\]"),
    "shape mismatch": (
        lambda tmp: {**_good0(), **_diffusers_keys({"2": _factors(2, 64, 64)})},
        r"'2' has down/A \(4, 64\) and up/B \(64, 4\), .* needs \[r, 128\] and \[64, r\]"),
    "empty file": (lambda tmp: _written(tmp / "empty.safetensors"), "holds no tensors"),
    "empty dict": (lambda tmp: {}, "holds no tensors"),
    "unreadable file": (lambda tmp: _written(tmp / "bad.safetensors", b"not safetensors at all"),
                        "cannot read the LoRA"),
    "missing file": (lambda tmp: tmp / "nowhere.safetensors", "no LoRA file"),
    "folder without a LoRA": (lambda tmp: tmp, "holds none of"),
    "unknown keys": (lambda tmp: {**_good0(), "0.weight": torch.randn(128, 64)},
                     r"not LoRA factors: \['0.weight'\]"),
    "half a pair": (lambda tmp: {"0.lora_A.weight": torch.randn(4, 64)}, "without both LoRA factors"),
    "DoRA": (lambda tmp: {**_good0(), "0.lora_magnitude_vector": torch.randn(128)}, "DoRA"),
    "two adapters in one file": (lambda tmp: {**_good0(), "0.lora_A.other.weight": torch.randn(4, 64)},
                                 "several adapters"),
    "an activation": (lambda tmp: _diffusers_keys({"1": _factors(2, 64, 128)}),
                      "a GELU; vqz adds LoRA to Linear"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sources_are_refused_and_change_nothing(tmp_path, case):
    model = _quantized(exclude=["2"])  # "2" in full precision: a failure must not leave it wrapped
    before = _snapshot(model)
    make, message = BAD[case]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lora.load_lora(model, make(tmp_path))
    _assert_unchanged(model, before)


def test_a_failure_while_applying_takes_back_what_was_done(monkeypatch):
    model = _quantized(exclude=["2"])
    before = _snapshot(model)
    calls = []

    def fail_second(layer, down, up):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        set_branch(layer, down, up)

    set_branch = lora._set_branch
    monkeypatch.setattr(lora, "_set_branch", fail_second)
    source = _diffusers_keys({"2": _factors(1, 128, 64), "0": _factors(2, 64, 128)})
    with pytest.raises(RuntimeError, match="out of memory"):
        lora.load_lora(model, source)
    _assert_unchanged(model, before)


def test_bad_calls_are_refused():
    good = _diffusers_keys({"0": _factors(1, 64, 128)})
    with pytest.raises(ValueError, match="not.*quantize"):
        lora.load_lora(_net(), good)
    model = _quantized()
    lora.load_lora(model, good, "style")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'style' is already loaded"):
        lora.load_lora(model, good, "style")
    with pytest.raises(ValueError, match="finite number"):
        lora.load_lora(model, good, "other", scale=float("nan"))
    for call in (lambda: lora.set_lora_scale(model, "styel", 1.0),
                 lambda: lora.remove_lora(model, "styel")):
        with pytest.raises(ValueError, match=r"no LoRA adapter named 'styel' .*\['style'\]"):
            call()
    _assert_equal(model.state_dict(), before[0])
    assert list(lora.list_loras(model)) == ["style"]


def test_convolutions_are_refused(convnet):
    model = vqz.quantize(convnet, "w8a8")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'pw', a QuantConv2d"):
        lora.load_lora(model, _diffusers_keys({"pw": _factors(1, 32, 48)}))
    _assert_unchanged(model, before)
