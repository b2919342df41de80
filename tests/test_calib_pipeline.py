import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import vqz  # noqa: E402
from vqz.calib import sources  # noqa: E402
from vqz.calib.pipeline import pipeline_forward_loop  # noqa: E402
from vqz.calib.prompts import default_prompts, read_prompts  # noqa: E402
from vqz.calib.timestep import TimestepTracker  # noqa: E402
from vqz.eval.images import sqnr  # noqa: E402
from vqz.nn import QuantLinear  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny, so threads only add synchronisation; on a busy 2-core machine two
    # threads made each UNet call up to 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _record_inputs(module):
    """Attach a pre-hook that keeps a copy of every tensor input of each call; returns (calls, handle)."""
    calls = []

    def hook(m, args, kwargs):
        calls.append([t.clone() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)])
    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_quantize_pipeline_from_prompts(tiny_sd_pipe):
    pipe = tiny_sd_pipe
    fp_unet = copy.deepcopy(pipe.unet)
    text_state, text_types = _snapshot(pipe.text_encoder)
    with TimestepTracker(pipe.unet) as steps:
        result = vqz.quantize(pipe, "w4a4-svd", calib=["a red car", "a cat on a sofa"], alpha=0.5)
    assert result is pipe
    # the pipeline ran itself once per prompt with its default 50 steps: statistics saw all of them
    assert len(steps.history) == 2 * 50
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2], QuantLinear)
    state, types = _snapshot(pipe.text_encoder)
    assert types == text_types and all(torch.equal(state[k], v) for k, v in text_state.items())

    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, 64, generator=g)
    with torch.no_grad():
        out, ref = pipe.unet(x, 500, context).sample, fp_unet(x, 500, context).sample
    assert sqnr(out, ref) > 7  # 9.2 dB: W4A4 convs and linears of a random-weight UNet
    latents = pipe(prompt=["a blue house"], num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_recorded_timesteps_span_the_scheduler_trajectory(tiny_sd_pipe):
    loop = pipeline_forward_loop(tiny_sd_pipe, ["a red car", "a dog"], num_inference_steps=6)
    with TimestepTracker(tiny_sd_pipe.unet) as steps:
        loop()
    expected = [float(t) for t in tiny_sd_pipe.scheduler.timesteps]
    assert len(expected) == 6 and len(set(expected)) == 6
    assert steps.history == expected + expected  # each prompt walks the whole trajectory once
    assert steps.current == expected[-1]
    train_steps = tiny_sd_pipe.scheduler.config.num_train_timesteps
    assert steps.history[0] == max(expected) == train_steps - 1 and steps.history[5] == min(expected) == 0


@pytest.mark.parametrize("guidance, branches", [(None, 2), (1.0, 1)])
def test_denoiser_sees_both_guidance_branches(tiny_sd_pipe, guidance, branches):
    calls, handle = _record_inputs(tiny_sd_pipe.unet)
    try:
        pipeline_forward_loop(tiny_sd_pipe, ["a red car", "a dog", "a tree"], batch_size=2,
                              num_inference_steps=2, guidance_scale=guidance)()
    finally:
        handle.remove()
    assert [c[0].shape[0] for c in calls] == [2 * branches] * 2 + [1 * branches] * 2
    if branches == 2:  # the pipeline's default guidance (7.5): unconditional half first
        context = calls[0][2]
        assert not torch.equal(context[:2], context[2:])
        assert torch.equal(context[0], context[1])  # both unconditional rows encode ""


def test_two_runs_give_identical_denoiser_inputs(tiny_sd_pipe):
    loop = pipeline_forward_loop(tiny_sd_pipe, ["a red car", "a dog", "a tree"], batch_size=2,
                                 num_inference_steps=3, seed=7)
    runs = []
    for _ in range(2):
        calls, handle = _record_inputs(tiny_sd_pipe.unet)
        loop(tiny_sd_pipe)  # also callable with the pipeline, as vqz.quantize calls calib(obj)
        handle.remove()
        runs.append(calls)
    assert len(runs[0]) == 6
    for first, second in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert tiny_sd_pipe._progress_bar_config == {"disable": True}  # the pipeline's setting is back
    other = pipeline_forward_loop(tiny_sd_pipe, ["a red car"], seed=8, num_inference_steps=1)
    calls, handle = _record_inputs(tiny_sd_pipe.unet)
    other()
    handle.remove()
    assert not torch.equal(calls[0][0], runs[0][0][0])  # the seed matters


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("  a red car \n\n\ta cat on a sofa\n   \n", encoding="utf-8")
    assert read_prompts(txt) == ["a red car", "a cat on a sofa"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text('Category\tPrompt\tNote\nAnimals\ta dog\t\nText\t"HI" painted on a wall\tquote\n'
                   'Empty\t \t\n', encoding="utf-8")
    assert read_prompts(str(tsv)) == ["a dog", '"HI" painted on a wall']
    no_column = tmp_path / "bad.tsv"
    no_column.write_text("Text\tCategory\na dog\tAnimals\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Prompt"):
        read_prompts(no_column)
    for name, text in [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.tsv", ""),
                       ("header.tsv", "Prompt\tCategory\n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="no prompts|empty"):
            read_prompts(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_default_prompts():
    prompts = default_prompts()
    assert len(set(prompts)) == len(prompts) >= 64
    assert all(p and p == p.strip() for p in prompts)


def test_shared_prompt_files():
    data = os.environ.get("VQZ_DATA")
    if not data or not (Path(data) / "prompts").is_dir():
        pytest.skip("VQZ_DATA is unset or has no prompts/ folder (CI sets it to ../shared/data)")
    parti = read_prompts(Path(data) / "prompts" / "PartiPrompts.tsv")
    assert len(parti) == 1632 and parti[0] == "bond"
    assert any(p.startswith('"G I G G L E" painted') for p in parti)
    coco = read_prompts(Path(data) / "prompts" / "coco-captions.txt")
    assert len(coco) == 795 and all(p.strip() == p and p for p in coco)


def test_num_frames_for_an_image_pipeline_leaves_the_model_unchanged(tiny_sd_pipe, guard):
    check = guard(tiny_sd_pipe.unet)
    with pytest.raises(ValueError, match="StableDiffusionPipeline takes no frame count"):
        pipeline_forward_loop(tiny_sd_pipe, ["a red car"], num_frames=8)
    with pytest.raises(ValueError, match="takes no frame count"):
        vqz.quantize(tiny_sd_pipe, "w4a4-svd",
                     calib=lambda pipe: pipeline_forward_loop(pipe, ["a car"], num_frames=8)())
    check()


def test_empty_prompts_and_bad_input(tiny_sd_pipe, guard):
    check = guard(tiny_sd_pipe.unet)
    with pytest.raises(ValueError, match="empty"):
        pipeline_forward_loop(tiny_sd_pipe, [])
    with pytest.raises(ValueError, match="empty"):
        vqz.quantize(tiny_sd_pipe, "w4a4-svd", calib=[])
    with pytest.raises(FileNotFoundError, match=r"calib=\['a red car'\]"):
        vqz.quantize(tiny_sd_pipe, "w4a4-svd", calib="a red car")
    with pytest.raises(TypeError, match="list"):
        pipeline_forward_loop(tiny_sd_pipe, "a red car")
    with pytest.raises(ValueError, match="another pipeline"):
        pipeline_forward_loop(tiny_sd_pipe, ["a car"])(object())
    check()


def test_pipeline_options_are_checked_against_its_signature(tiny_sd_pipe):
    class ClassConditional:  # a DiTPipeline-like pipeline: class labels, no prompts
        components = {}
        transformer = nn.Linear(2, 2)

        def __call__(self, class_labels, generator=None, guidance_scale=4.0):
            pass
    with pytest.raises(TypeError, match="no `prompt` argument"):
        pipeline_forward_loop(ClassConditional(), ["a car"])
    with pytest.raises(TypeError, match="diffusers pipeline"):
        pipeline_forward_loop(nn.Linear(2, 2), ["a car"])


def test_prompt_sources_for_a_pipeline(tiny_sd_pipe, monkeypatch, tmp_path, mlp):
    seen = []
    monkeypatch.setattr(sources, "pipeline_forward_loop", lambda pipe, prompts: seen.append(prompts))
    file = tmp_path / "p.txt"
    file.write_text("a red car\na dog\n", encoding="utf-8")
    for calib in (["a", "b"], ("a", "b"), "default", str(file), file):
        sources.as_forward_loop(calib, tiny_sd_pipe, tiny_sd_pipe.unet)
    assert seen == [["a", "b"], ["a", "b"], default_prompts(), ["a red car", "a dog"],
                    ["a red car", "a dog"]]
    with pytest.raises(TypeError, match="pipeline"):
        sources.as_forward_loop(file, mlp, mlp)


def test_tracker_on_a_bare_denoiser_driven_by_a_user_loop(tiny_sd_pipe):
    unet = copy.deepcopy(tiny_sd_pipe.unet)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, 64, generator=g)

    def forward_loop(model):
        model(x, timestep=torch.tensor([900.0, 900.0]), encoder_hidden_states=context)
        model(x, 250, context)  # positional
    with TimestepTracker(unet) as steps:
        vqz.quantize(unet, "w4a4-svd", calib=forward_loop)
    assert steps.history == [900.0, 250.0]
    with TimestepTracker(nn.Linear(4, 4)) as none:
        none.denoiser(torch.randn(1, 4))
    assert none.history == [None] and none.current is None
    assert not unet._forward_pre_hooks  # the tracker removed its hook
