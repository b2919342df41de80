import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run in Triton's interpreter (read when a kernel is defined, so
# this must precede any import of them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class MLP(nn.Module):
    def __init__(self, dim=128, hidden=512, out=64):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    """Conv stem (3 input channels: not a multiple of any group size), depthwise conv, linear head,
    plus layer types vqz does not quantize (Conv1d, Embedding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect")
        self.pw = nn.Conv2d(32, 48, 1)
        self.seq = nn.Conv1d(4, 4, 3)
        self.embed = nn.Embedding(10, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))
        return self.head(h.mean((2, 3)) + self.embed.weight[0])


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


@pytest.fixture
def guard():
    """guard(model) records everything a failed quantize/load must leave as it was (tensors,
    module classes, training flags) and returns a check that asserts it still is."""
    def record(model):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        modules = [(n, type(m)) for n, m in model.named_modules()]
        modes = [m.training for m in model.modules()]

        def check():
            now = model.state_dict()
            assert set(now) == set(state)
            for k, v in state.items():
                assert torch.equal(now[k], v), k
            assert [(n, type(m)) for n, m in model.named_modules()] == modules
            assert [m.training for m in model.modules()] == modes
            assert getattr(model, "_vqz_state", None) is None
        return check
    return record


def build_tiny_sd_pipeline(seed: int = 0):
    """A real diffusers StableDiffusionPipeline with random weights, built offline in a fraction of
    a second once diffusers is imported: UNet2DConditionModel (channels 32/64, cross-attention at
    the first level and in the mid block, 8x8 latents),
    AutoencoderKL (scale factor 2, so 16x16 px images), a 2-layer CLIPTextModel, a character-level
    CLIPTokenizer over the byte-level alphabet (no vocab files) and EulerDiscreteScheduler with its
    default config but steps_offset=1 as in SD 1.5's (1000 training steps, "linspace" spacing:
    timesteps run 999 -> 0). The pipeline keeps its defaults: 50 steps, guidance 7.5 (both
    classifier-free guidance branches in one batch). Its own step bar is off."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    symbols = pre_tokenizers.ByteLevel.alphabet()
    # one token per byte-level character, with and without the end-of-word mark: no merges needed
    tokens = specials + sorted(symbols) + [s + "</w>" for s in sorted(symbols)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    for model in (unet, vae, text_encoder):
        model.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sd_pipe():
    """build_tiny_sd_pipeline(); skips when diffusers or transformers is missing."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny ops (on a 2-core machine, threads make them
    10-100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_denoisers():
    """The module tests/tiny_denoisers.py: tiny diffusers denoisers and example inputs for each."""
    pytest.importorskip("diffusers")
    path = Path(__file__).with_name("tiny_denoisers.py")
    spec = importlib.util.spec_from_file_location("tiny_denoisers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast built in memory (offline): pad id 0, "</s>" (id 1)
    appended to every text, "<unk>" (id 2) for words outside its small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ("a an the of on at in and with boat lake city night red car dog cat tree house blue "
             "sky over under big small").split()
    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_tiny_wan_pipeline(seed: int = 0):
    """A real diffusers WanPipeline (text-to-video) with random weights, built offline: a 2-layer
    WanTransformer3DModel (tests/tiny_denoisers.py's config: 4 latent channels, patch (1, 2, 2),
    text_dim 24), an AutoencoderKLWan with z_dim 4 and one spatial and one temporal down/upsampling
    (base_dim 8, dim_mult (1, 2): scale factors 2 in space and time, so num_frames must be 1 + 2k and
    height/width multiples of 4), a 2-layer UMT5EncoderModel with d_model 24, a word-level
    PreTrainedTokenizerFast built in memory (pad id 0, "</s>" appended as T5's does) and Wan 2.1's
    scheduler: UniPCMultistepScheduler for flow matching (flow_shift 3). The pipeline keeps its
    __call__ defaults (81 frames of 480x832, 50 steps, guidance 5.0, 512 text tokens); with
    guidance > 1 it calls the transformer twice per step, conditional then unconditional (not one
    2x batch as the SD pipelines do). Its own step bar is off. Needs the `regex` package (imported by
    diffusers' Wan pipeline); ftfy is optional."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                           temperal_downsample=[True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                           scale_factor_temporal=2, scale_factor_spatial=2)
    tokenizer = word_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                       vae=vae, scheduler=scheduler)
    for model in (transformer, vae, text_encoder):
        model.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_wan_pipe():
    """build_tiny_wan_pipeline(); skips when diffusers, transformers or regex is missing."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("regex")
    return build_tiny_wan_pipeline()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A folder holding a randomly initialised transformers CLIPModel (32x32 images, patch 8,
    width 32) and the word-level tokenizer, loadable with from_pretrained offline."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    tokenizer = word_tokenizer()
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
                     "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
