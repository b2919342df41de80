import copy

import pytest
import torch
from torch import nn

import vqz
from vqz.eval.images import sqnr
from vqz.nn.timestep import BucketedQuantizer, bucket_edges

TIMESTEPS = [0, 100, 250, 400, 550, 700, 850, 999]


class Denoiser(nn.Module):
    """Activations whose range grows 30x along the trajectory, as in real denoisers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, timestep):
        scale = 1 + 29 * timestep.float()[:, None] / 1000
        return self.fc2(torch.relu(self.fc1(x * scale)))


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(128, 32, generator=g), "timestep": torch.full((128,), t)} for t in TIMESTEPS]


@pytest.fixture
def denoiser():
    torch.manual_seed(0)
    return Denoiser().eval()


def _mean_sqnr(ref_model, model):
    with torch.no_grad():
        return sum(sqnr(model(**b), ref_model(**b)) for b in _batches(1)) / len(TIMESTEPS)


def test_buckets_follow_the_timestep_and_beat_one_range(denoiser):
    one = vqz.quantize(copy.deepcopy(denoiser), "w8a8-static", calib=_batches())
    four = vqz.quantize(copy.deepcopy(denoiser), "w8a8-static", calib=_batches(), timestep_buckets=4)
    q = four.fc1.act_quantizer
    assert isinstance(q, BucketedQuantizer) and len(q.quantizers) == 4
    assert q.edges.tolist() == [175.0, 475.0, 775.0]
    scales = [sub.scale.item() for sub in q.quantizers]
    assert scales == sorted(scales) and scales[-1] > 5 * scales[0]
    assert _mean_sqnr(denoiser, four) > _mean_sqnr(denoiser, one) + 3
    assert vqz.summary(four)[0]["calib"] == "mse, 4 timestep ranges"


def test_save_load_and_copies_keep_their_own_timestep(denoiser, tmp_path):
    q = vqz.quantize(denoiser, "w8a8-static", calib=_batches(), timestep_buckets=4)
    twin = copy.deepcopy(q)
    skeleton = Denoiser()
    vqz.load(skeleton, vqz.save(q, tmp_path / "q.safetensors"))
    with torch.no_grad():
        for b in _batches(2):
            expected = q(**b)
            assert torch.equal(skeleton(**b), expected) and torch.equal(twin(**b), expected)
    assert twin.fc1.act_quantizer.state is twin._vqz_timestep


def test_unknown_timestep_at_inference(denoiser):
    vqz.quantize(denoiser, "w8a8-static", calib=_batches(), timestep_buckets=2)
    with pytest.raises(RuntimeError, match="timestep"):
        denoiser.fc1(torch.randn(2, 32))


def test_too_few_timesteps_leaves_the_model_untouched(denoiser, guard):
    check = guard(denoiser)
    with pytest.raises(ValueError, match="distinct timesteps"):
        vqz.quantize(denoiser, "w8a8-static", calib=_batches()[:2], timestep_buckets=4)
    check()
    assert not hasattr(denoiser, "_vqz_timestep")
    assert not denoiser._forward_pre_hooks and not denoiser._forward_hooks


def test_bucket_edges_split_distinct_timesteps_evenly():
    assert bucket_edges([1.0, 0.5, 0.5, 0.25, 0.0], 2).tolist() == [0.375]
    assert bucket_edges(list(range(10)) * 3, 5).tolist() == [1.5, 3.5, 5.5, 7.5]


def test_a_batch_mixing_timesteps_quantizes_each_sample_by_its_own_range(denoiser):
    q = vqz.quantize(denoiser, "w8a8-static", calib=_batches(), timestep_buckets=4)
    x = torch.randn(len(TIMESTEPS), 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        mixed = q(x, t)
        alone = torch.cat([q(x[i:i + 1], t[i:i + 1]) for i in range(len(TIMESTEPS))])
        first_range = q(x, t[:1].expand(len(TIMESTEPS)))
    assert torch.allclose(mixed, alone, atol=1e-5)
    assert (mixed - first_range)[4:].abs().max() > 100 * (mixed - alone).abs().max() + 1e-3
