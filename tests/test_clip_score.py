"""CLIP score: the formula on a real (tiny, random) transformers CLIPModel, and skipping without one."""
import pytest
import torch
import torch.nn.functional as F

from vqz.eval.clip_score import clip_scorer
from vqz.eval.features import MetricUnavailable

transformers = pytest.importorskip("transformers")


def test_score_is_100_times_the_clamped_cosine_of_the_embeddings(tiny_clip_dir):
    score = clip_scorer(str(tiny_clip_dir))
    model = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_clip_dir)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)  # already CLIP's size: no resize, only normalisation
    prompts = ["a red car", "a dog on a boat", "the city at night"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=(images - mean) / std)
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    want = 100 * F.cosine_similarity(image, text).clamp(min=0)
    assert torch.allclose(score(images, prompts), want, atol=1e-4)
    # a wider image is resized on its short side and centre-cropped, not squashed
    wide = torch.cat([torch.zeros(1, 3, 32, 16), images[:1], torch.zeros(1, 3, 32, 16)], dim=-1)
    assert torch.allclose(score(wide, prompts[:1]), want[:1], atol=1e-4)


def test_missing_model_is_reported_as_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="cannot load the CLIP model"):
        clip_scorer(str(tmp_path / "no-such-clip"))
