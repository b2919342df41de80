"""Prompt calibration of a video pipeline: a tiny, real diffusers WanPipeline built offline
(build_tiny_wan_pipeline in conftest.py) generates from prompts while vqz calibrates its transformer."""
import functools

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("regex")

import vqz  # noqa: E402
from vqz.calib.pipeline import pipeline_forward_loop  # noqa: E402
from vqz.calib.timestep import TimestepTracker  # noqa: E402
from vqz.nn import QuantLinear  # noqa: E402

PROMPTS = ["a boat on a lake", "a city at night"]
SMALL = dict(num_inference_steps=2, num_frames=5, height=16, width=16)
LATENT = (4, 3, 8, 8)  # z_dim 4; (5 - 1) // 2 + 1 latent frames; 16 px / scale factor 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()  # tiny models on a busy machine: threads only add waiting
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _record(module):
    """A pre-hook keeping (hidden_states, timestep, encoder_hidden_states) of every call."""
    calls = []

    def hook(m, args, kwargs):
        calls.append(tuple(kwargs[k].clone() for k in
                           ("hidden_states", "timestep", "encoder_hidden_states")))
    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _unchanged(model, snapshot):
    state, types = _snapshot(model)
    return types == snapshot[1] and all(torch.equal(state[k], v) for k, v in snapshot[0].items())


def test_tiny_wan_pipeline_is_real(tiny_wan_pipe):
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel
    pipe = tiny_wan_pipe
    assert type(pipe) is WanPipeline and isinstance(pipe.text_encoder, UMT5EncoderModel)
    ids = pipe.tokenizer(PROMPTS[0]).input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id and pipe.tokenizer.unk_token_id not in ids
    # the shapes of LATENT: 5 frames are 3 latent frames, 16 px are 8 latents
    assert pipe.vae_scale_factor_temporal == 2 and pipe.vae_scale_factor_spatial == 2


def test_quantize_wan_pipeline_from_prompts(tiny_wan_pipe):
    pipe = tiny_wan_pipe
    text, vae = _snapshot(pipe.text_encoder), _snapshot(pipe.vae)
    loop = pipeline_forward_loop(pipe, PROMPTS, **SMALL)

    calls, handle = _record(pipe.transformer)
    try:
        with TimestepTracker(pipe.transformer) as steps:
            loop()
    finally:
        handle.remove()
    expected = [float(t) for t in pipe.scheduler.timesteps]
    assert len(expected) == 2 and expected[0] == 999 and expected[0] > expected[1]
    # Wan guides (default 5.0) with two calls per step, conditional then unconditional, batch 1
    assert steps.history == [t for t in expected for _ in range(2)] * len(PROMPTS)
    assert len(calls) == 2 * 2 * len(PROMPTS)
    for x, t, context in calls:
        assert x.dim() == 5 and x.shape == (1, *LATENT) and t.shape == (1,)
        assert x.shape[2] == (SMALL["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
        assert context.shape == (1, 512, 24)  # the pipeline's default max_sequence_length
    for i in range(0, len(calls), 2):
        (x_c, t_c, cond), (x_u, t_u, uncond) = calls[i], calls[i + 1]
        assert torch.equal(x_c, x_u) and torch.equal(t_c, t_u)  # the same latents, both branches
        assert not torch.equal(cond, uncond)
        assert torch.equal(uncond, calls[1][2])  # every negative prompt is the default ""
    assert not torch.equal(calls[0][2], calls[4][2])  # the two prompts differ
    assert not torch.equal(calls[0][0], calls[4][0])  # batch i is seeded seed + i

    calls, handle = _record(pipe.transformer)
    try:
        result = vqz.quantize(pipe, "w4a4-svd", calib=loop, rank=8, alpha=0.5)
    finally:
        handle.remove()
    assert result is pipe
    runs = len(calls) // 8
    assert runs >= 1 and len(calls) == 8 * runs  # whole runs of the loop, bitwise repeatable
    for j in range(8, len(calls)):
        assert all(torch.equal(a, b) for a, b in zip(calls[j], calls[j % 8]))

    quantized = [n for n, m in pipe.transformer.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 20  # 2 blocks x (4 self-attention + 4 cross-attention + 2 FFN)
    assert isinstance(pipe.transformer.blocks[0].ffn.net[2], QuantLinear)
    assert isinstance(pipe.transformer.blocks[1].attn1.to_q, QuantLinear)
    assert _unchanged(pipe.text_encoder, text) and _unchanged(pipe.vae, vae)
    assert not any(isinstance(m, QuantLinear) for m in (*pipe.text_encoder.modules(),
                                                         *pipe.vae.modules()))

    video = pipe(prompt=["a red car"], generator=torch.Generator().manual_seed(0),
                 max_sequence_length=16, output_type="np", **SMALL).frames
    assert video.shape == (1, 5, 16, 16, 3) and torch.isfinite(torch.as_tensor(video)).all()
    latents = pipe(prompt=["a red car"], generator=torch.Generator().manual_seed(0),
                   output_type="latent", **SMALL).frames
    assert latents.shape == (1, *LATENT) and torch.isfinite(latents).all()


def _cheap_defaults(pipe):
    """The same components in a WanPipeline subclass whose __call__ defaults are small enough for a
    test. WanPipeline's own (81 frames of 480x832, 50 steps, 512 text tokens) are 21 x 30 x 52 =
    32,760 video tokens per transformer call and 100 calls per prompt: far too slow on a CPU."""
    from diffusers import WanPipeline

    class CheapWanPipeline(WanPipeline):
        __call__ = functools.partialmethod(WanPipeline.__call__, max_sequence_length=16, **SMALL)
    cheap = CheapWanPipeline(**pipe.components)
    cheap.set_progress_bar_config(disable=True)
    return cheap


def test_prompt_list_uses_the_pipeline_defaults(tiny_wan_pipe):
    pipe = _cheap_defaults(tiny_wan_pipe)
    calls, handle = _record(pipe.transformer)
    try:
        vqz.quantize(pipe, "w4a4-svd", calib=PROMPTS, rank=8, alpha=0.5)
    finally:
        handle.remove()
    assert len(calls) > 0 and len(calls) % 8 == 0  # 2 prompts x 2 steps x 2 guidance branches
    assert all(x.shape == (1, *LATENT) and c.shape == (1, 16, 24) for x, _, c in calls)
    assert isinstance(pipe.transformer.blocks[0].ffn.net[2], QuantLinear)


def test_option_the_video_pipeline_does_not_take(tiny_wan_pipe, guard):
    from diffusers import WanPipeline

    class DistilledWanPipeline(WanPipeline):
        """Like HunyuanVideo15Pipeline or MotifVideoPipeline: guidance is built in, so its
        __call__ takes no guidance_scale."""

        def __call__(self, prompt=None, height=16, width=16, num_frames=5, num_inference_steps=2,
                     generator=None, output_type="np"):
            return super().__call__(prompt=prompt, height=height, width=width, num_frames=num_frames,
                                    num_inference_steps=num_inference_steps, generator=generator,
                                    output_type=output_type, guidance_scale=1.0)
    pipe = DistilledWanPipeline(**tiny_wan_pipe.components)
    check = guard(pipe.transformer)
    pipeline_forward_loop(pipe, PROMPTS, num_frames=5, height=16, width=16)  # these it takes
    with pytest.raises(ValueError, match="DistilledWanPipeline does not take guidance_scale="):
        pipeline_forward_loop(pipe, PROMPTS, guidance_scale=5.0, **SMALL)
    with pytest.raises(ValueError, match="does not take guidance_scale="):
        vqz.quantize(pipe, "w4a4-svd", calib=lambda p: pipeline_forward_loop(
            p, PROMPTS, guidance_scale=5.0)())
    check()
    # the real WanPipeline takes every option pipeline_forward_loop has, num_frames included
    pipeline_forward_loop(tiny_wan_pipe, PROMPTS, guidance_scale=1.0, batch_size=2, **SMALL)


def test_frames_reaches_a_pipeline_that_calls_it_frames(tiny_wan_pipe):
    from vqz.calib.pipeline import call_options
    from vqz.eval.generation import generate

    class Called(Exception):
        pass

    class FramesPipeline(type(tiny_wan_pipe)):
        def __call__(self, prompt=None, generator=None, frames=None, output_type=None):
            raise Called(frames)

    pipe = FramesPipeline.__new__(FramesPipeline)
    assert call_options(pipe, num_frames=5) == {"frames": 5}
    with pytest.raises(Called, match="5"):  # vqz generate / eval-pipeline --frames 5
        generate(pipe, "a prompt", 0, frames=5)
