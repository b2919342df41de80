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
    # a wider image is resized on its short side and centre-cropped, not squashed; checked on a
    # pair whose score the clamp leaves above 0 (a random CLIP scores most pairs at 0)
    positive = int(want.argmax())
    assert want[positive] > 0.5
    wide = torch.cat([torch.zeros(1, 3, 32, 16), images[positive:positive + 1],
                      torch.zeros(1, 3, 32, 16)], dim=-1)
    got = score(wide, prompts[positive:positive + 1])
    assert torch.allclose(got, want[positive:positive + 1], atol=1e-4)


def test_missing_model_is_reported_as_unavailable(tmp_path):
    with pytest.raises(MetricUnavailable, match="cannot load the CLIP model"):
        clip_scorer(str(tmp_path / "no-such-clip"))


def test_pipeline_eval_scores_every_image_against_its_own_prompt(tmp_path, monkeypatch):
    """The batched scoring of `vqz eval pipeline` pairs every image (video frames included) with the
    prompt it was generated from, prompts[i % len(prompts)], and averages over all of them. A stand-in
    scorer (mean pixel times the prompt's length) makes each pairing visible."""
    from PIL import Image

    from vqz.eval import pipeline_eval
    from vqz.eval.image_sets import load_image

    def scorer(model_id, device):
        return lambda images, texts: images.mean((1, 2, 3)) * torch.tensor([len(t) for t in texts])

    monkeypatch.setattr(pipeline_eval, "clip_scorer", scorer)
    torch.manual_seed(0)
    prompts = ["a red car", "a dog on a boat", "the city at night"]
    count = pipeline_eval.CLIP_BATCH + 3
    names = [f"{i:05d}.png" for i in range(count)] + [f"{count:05d}/0000.png", f"{count:05d}/0001.png"]
    for side in ("reference", "quantized"):
        for name in names:
            path = tmp_path / side / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy()).save(path)
    got = pipeline_eval._clip_scores("clip", prompts, [{"ref": n, "test": n} for n in names],
                                     tmp_path, "cpu")
    for key, side in (("clip_reference", "reference"), ("clip_test", "quantized")):
        want = [load_image(tmp_path / side / n).mean().item() * len(prompts[int(n[:5]) % 3])
                for n in names]
        assert got[key]["value"] == pytest.approx(sum(want) / len(want), rel=1e-6)
