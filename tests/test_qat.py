"""QAT: the rank schedule, the wrapper (decaying or kept branch), export, the trainer and its
checkpoints."""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import vqz
from vqz.algorithms.svd import svd_quantize
from vqz.config import LayerRule, QuantSpec, get_preset, get_qat_preset
from vqz.eval.images import sqnr
from vqz.nn import QuantLinear
from vqz.qat import QATLinear, RankSchedule
from vqz.qat.data import Record, merge_records
from vqz.qat.model import apply_schedule
from vqz.qat.schedule import decay_ranks
from vqz.qat.stability import clip_spikes, reset_moments
from vqz.qat.trainer import TrainOptions, _optimizer, lr_factor
from vqz.quantizer import Quantizer

pytestmark = pytest.mark.usefixtures("one_thread")

W4 = QuantSpec("int4", "group", 16, observer="mse", learnable=True)
A4 = QuantSpec("int4", "group", 16, dynamic=True, learnable=True)


def test_decay_ranks_halve_to_zero():
    assert decay_ranks(32) == [16, 8, 4, 2, 1, 0]
    assert decay_ranks(24) == [12, 6, 3, 1, 0]
    assert decay_ranks(0) == []


def test_schedule_states_follow_the_cosine_fade():
    s = RankSchedule(rank=8, every=10, start=5)
    assert s.end == 5 + 4 * 10
    assert s.state(0) == (8, 0, 1.0)
    assert s.state(5) == (4, 4, 1.0)  # phase 0 starts with the dropped half at full weight
    kept, fading, u = s.state(5 + 5)
    assert (kept, fading) == (4, 4) and u == pytest.approx((1 + math.cos(math.pi / 2)) / 2)
    assert s.state(15)[:2] == (2, 2) and s.state(35)[:2] == (0, 1)
    assert s.state(45) == (0, 0, 1.0) and s.phase(45) is None


def test_schedule_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"does not fit 50 steps.*end at step 60.*decay_every <= 8"):
        RankSchedule(rank=32, every=10).check_fits(50)
    with pytest.raises(ValueError, match=r"decays in 6 phases"):
        RankSchedule.fitted(32, steps=7)
    assert RankSchedule.fitted(32, steps=100).end <= 75


def _linear(n=48, k=64, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    layer.weight.data[:, 3] *= 20  # an outlier column gives the residual some structure
    return layer


def test_full_rank_branch_restores_the_weight_exactly():
    linear = _linear()
    layer = QATLinear(linear, W4, None, rank=48)
    w_hat = layer.weight_quantizer(layer.weight) + (layer.lora_down @ layer.lora_up).T
    assert (w_hat - linear.weight).abs().max() < 1e-4
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), linear(x), atol=1e-4)


def test_wrapper_trains_a_copy_of_the_weight():
    linear = _linear()
    before = linear.weight.detach().clone()
    layer = QATLinear(linear, W4, None, rank=4)  # no smoothing or rotation: W' = W
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(linear.weight, before)  # a failed run can put the original back


def test_refactor_keeps_the_best_low_rank_part():
    layer = QATLinear(_linear(), W4, None, rank=16)
    with torch.no_grad():
        layer.lora_down.normal_()
        layer.lora_up.normal_()
        layer.fade[12:] = 0.5
    product = (layer.lora_down * layer.fade) @ layer.lora_up
    u, s, vh = torch.linalg.svd(product)
    best4 = (u[:, :4] * s[:4]) @ vh[:4]
    layer.refactor(4)
    layer.set_fade(4, 0, 1.0)
    got = (layer.lora_down * layer.fade) @ layer.lora_up
    assert (got - best4).abs().max() < 1e-3 * best4.abs().max()
    assert layer.lora_down[:, 4:].abs().max() == 0 and layer.lora_up[4:].abs().max() == 0


def test_learned_clip_starts_as_the_plain_dynamic_quantizer_and_gets_gradients():
    x = torch.randn(6, 64, requires_grad=True)
    learned = Quantizer(A4)
    plain = Quantizer(replace(A4, learnable=False))
    y = learned(x)
    assert torch.equal(y, plain(x))
    ((y - 0.3 * x.detach()) ** 2).sum().backward()
    assert learned.clip.grad is not None and learned.clip.grad.abs() > 0
    with torch.no_grad():
        learned.clip.fill_(0.5)
    assert torch.allclose(learned.quantize(x)["scale"], 0.5 * plain.quantize(x)["scale"], rtol=1e-6)


def test_export_at_rank_zero_equals_the_wrapper():
    layer = QATLinear(_linear(), W4, A4, rank=8)
    x = torch.randn(7, 64)
    with pytest.raises(ValueError, match="still has rank 8"):
        layer.to_quant_linear()
    layer.refactor(0)
    layer.set_fade(0, 0, 1.0)
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(1.1)  # as if trained
        layer.act_quantizer.clip.fill_(0.8)
    exported = layer.to_quant_linear()
    assert isinstance(exported, QuantLinear) and exported.rank == 0
    assert torch.equal(exported(x), layer(x))


def test_smoothed_wrapper_divides_the_input_and_exports_the_same_function():
    linear = _linear()
    lam = torch.rand(64) + 0.5
    layer = QATLinear(linear, W4, None, rank=48, smooth=lam)
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), linear(x), atol=1e-4)  # full rank: W diag(λ) (x / λ) = W x
    quantized = QATLinear(linear, W4, A4, rank=4, smooth=lam)
    quantized.refactor(0)
    quantized.set_fade(0, 0, 1.0)
    exported = quantized.to_quant_linear()
    assert torch.equal(exported.smooth, lam) and torch.equal(exported(x), quantized(x))


def _svd_factors(linear, rank, seed=1):
    """svd_quantize's smoothing and branch for `linear`, from random calibration rows."""
    x = torch.randn(32, linear.in_features, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 10  # an outlier channel, so smoothing has something to move
    return svd_quantize(linear.weight, rank=rank, weight_spec=W4, act_spec=A4,
                        x_absmax=x.abs().amax(0), x_sample=x)


@pytest.mark.parametrize("rotate", [False, True])
def test_kept_branch_starts_as_svdquant_and_exports_what_it_trained(rotate):
    linear = _linear()
    svd = _svd_factors(linear, rank=8)
    layer = QATLinear(linear, W4, A4, rank=8, smooth=svd.smooth, rotate=rotate, lowrank=svd.lowrank)
    frozen = [replace(s, learnable=False) for s in (W4, A4)]
    ptq = QuantLinear.from_float(linear, *frozen, smooth=svd.smooth, lowrank=svd.lowrank,
                                 rotate=rotate)
    x = torch.randn(7, 64) * torch.linspace(0.1, 3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), ptq(x))
        assert torch.equal(layer.weight_quantizer(layer.weight), ptq.dequantized_weight())
    assert apply_schedule([layer], RankSchedule(8, every=1), step=3) is False  # not decayed
    assert torch.equal(layer.fade, torch.ones(8)) and torch.equal(layer.lora_down, ptq.lora_down)
    with torch.no_grad():  # as if trained
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))
        layer.lora_down.mul_(1.2)
        layer.weight_quantizer.scale.mul_(1.1)
        layer.act_quantizer.clip.fill_(0.8)
    exported = layer.to_quant_linear()
    assert exported.rank == 8 and exported.rotate == rotate
    assert torch.equal(exported.lora_down, layer.lora_down)
    assert torch.equal(exported.lora_up, layer.lora_up)
    with torch.no_grad():
        assert torch.equal(exported(x), layer(x))
        assert not torch.equal(exported(x), ptq(x))


def test_kept_branch_of_another_rank_is_refused():
    linear = _linear()
    with pytest.raises(ValueError, match="kept branch has rank 8, the layer rank 4"):
        QATLinear(linear, W4, A4, rank=4, lowrank=_svd_factors(linear, rank=8).lowrank)


def test_spike_clipping_and_moment_reset():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"exp_avg_sq": torch.full((4,), 1e-4), "exp_avg": torch.zeros(4), "step": torch.tensor(3.)}
    p.grad = torch.tensor([0.5, -0.5, 1e-3, -1e-3])
    assert clip_spikes(opt, threshold=100.0) == 2  # limit sqrt(100 * 1e-4) = 0.1
    assert torch.allclose(p.grad, torch.tensor([0.1, -0.1, 1e-3, -1e-3]))
    reset_moments(opt, [p])
    assert p not in opt.state


def test_merged_records_batch_the_calls_and_expand_per_call_timesteps():
    a = Record((torch.ones(2, 3),), {"timestep": torch.tensor(5.0), "flag": True}, torch.zeros(2, 3), 5.0)
    b = Record((torch.full((3, 3), 2.0),), {"timestep": torch.tensor(7.0), "flag": True},
               torch.ones(3, 3), 7.0)
    merged = merge_records([a, b])
    assert torch.equal(merged.args[0], torch.cat([a.args[0], b.args[0]]))
    assert merged.kwargs["timestep"].tolist() == [5, 5, 7, 7, 7] and merged.kwargs["flag"] is True
    assert torch.equal(merged.target, torch.cat([a.target, b.target]))
    assert merged.parts == [(2, 5.0), (3, 7.0)] and merged.timestep is None
    other = Record((torch.ones(2, 4),), {"timestep": torch.tensor(5.0), "flag": True}, torch.zeros(2, 3), 5.0)
    with pytest.raises(ValueError, match="records_per_step=1"):
        merge_records([a, other])


def test_loss_weights_each_merged_call_and_pairs_the_guidance_halves():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from vqz.qat.trainer import _loss

    class Echo(nn.Module):
        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    calls = [Record((torch.randn(4, 3, generator=g),), {}, torch.randn(4, 3, generator=g), t)
             for t in (100.0, 900.0)]
    merged = merge_records(calls)
    accelerator = SimpleNamespace(device="cpu", autocast=nullcontext)
    weight = {100.0: 0.5, 900.0: 2.0}.get
    opts = TrainOptions(steps=2, schedule=RankSchedule(0, 1), timestep_weight=weight, guidance_loss=9.0)
    expected = 0
    for r in calls:
        e = r.args[0] - r.target
        expected += weight(r.timestep) * (e.pow(2).mean() + 9.0 * (e[:2] - e[2:]).pow(2).mean()) / 2
    assert torch.allclose(_loss(Echo(), merged, accelerator, opts), expected)
    plain = replace(opts, timestep_weight=None, guidance_loss=0.0)
    assert torch.allclose(_loss(Echo(), merged, accelerator, plain),
                          (merged.args[0] - merged.target).pow(2).mean())
    odd = Record((torch.ones(3, 3),), {}, torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="3 samples"):
        _loss(Echo(), odd, accelerator, opts)


def test_cosine_learning_rate_after_warm_up():
    opts = TrainOptions(steps=12, schedule=RankSchedule(0, 1), lr_schedule="cosine", warmup_steps=2)
    factors = [lr_factor(opts, s) for s in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(0, abs=1e-12)
    assert factors[2 + 9 // 2] == pytest.approx((1 + math.cos(math.pi * 4 / 9)) / 2)
    assert all(x >= y for x, y in zip(factors[1:], factors[2:]))
    assert lr_factor(replace(opts, lr_schedule="constant", warmup_steps=0), 11) == 1.0
    for bad in ({"lr_schedule": "linear"}, {"warmup_steps": 12}, {"records_per_step": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainOptions(steps=12, schedule=RankSchedule(0, 1), **bad)


def test_quantizers_learn_at_their_own_rate_and_zero_freezes_them():
    model = nn.Sequential(QATLinear(_linear(), W4, A4, rank=8))
    for quant_lr, expected in ((None, 1e-4), (0.0, 0.0), (1e-5, 1e-5)):
        opts = TrainOptions(steps=4, schedule=RankSchedule(0, 1), lr=1e-4, quant_lr=quant_lr)
        weights, quantizers = _optimizer(model, opts).param_groups
        assert weights["lr"] == 1e-4 and quantizers["lr"] == expected
        assert {id(p) for p in quantizers["params"]} == {
            id(p) for q in (model[0].weight_quantizer, model[0].act_quantizer) for p in q.parameters()}
    with pytest.raises(ValueError, match="quant_lr must be >= 0"):
        TrainOptions(steps=4, schedule=RankSchedule(0, 1), quant_lr=-1e-5)


# ---- training ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dit(tiny_denoisers):
    build, inputs = tiny_denoisers.FAMILIES["dit"]
    return build, [inputs(s) for s in range(4)]


def _recipe(rank=8):
    return replace(get_qat_preset("w4a4-qat"), rank=rank)


def _train(model, data, steps=16, **kw):
    kw.setdefault("decay_every", 2)
    return vqz.train_qat(model, _recipe(), data=data, steps=steps, lr=1e-4, **kw)


def _epoch_means(log, n):
    """Mean loss of the first and the last epoch: every record once in each, so they compare."""
    return sum(log.losses[:n]) / n, sum(log.losses[-n:]) / n


@torch.no_grad()
def _out(model, x):
    return model(**x, return_dict=False)[0]


def test_trained_model_is_plain_quantized_and_closer_than_its_start(tiny_dit, tmp_path):
    build, data = tiny_dit
    fp = build()
    model = build()
    log = _train(model, data, steps=24, decay_every=2, decay_start=4)
    assert log.ranks[:4] == [8] * 4 and log.ranks[4] == 8 and log.ranks[6] == 4
    assert log.ranks[-12:] == [0] * 12  # 4 phases of 2 steps from step 4: rank 0 from step 12
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("to_q"))
    first, last = _epoch_means(log, 4)
    assert last < first
    start = vqz.quantize(build(), "w4a4")  # round to nearest, the same formats, no training
    for x in data:
        assert sqnr(_out(model, x), _out(fp, x)) > sqnr(_out(start, x), _out(fp, x))
    vqz.save(model, tmp_path / "q")
    loaded = vqz.load(build(), tmp_path / "q")
    for x in data:
        assert torch.equal(_out(loaded, x), _out(model, x))


def test_several_records_per_forward_train_with_a_cosine_schedule(tiny_dit):
    build, data = tiny_dit
    model = build()
    log = _train(model, data, steps=12, decay_every=1, records_per_step=2, lr_schedule="cosine",
                 warmup_steps=2)
    assert log.samples == 12 * 2 * data[0]["hidden_states"].shape[0]
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    first, last = _epoch_means(log, 2)
    assert last < first
    with pytest.raises(ValueError, match="records_per_step=8"):
        _train(build(), data, steps=4, decay_every=1, records_per_step=8)


def test_refresh_re_records_the_students_own_trajectories(tiny_dit):
    build, data = tiny_dit
    runs = []

    def two_step_sampler(model):
        """Each call's input depends on the model's previous answer, as along a sampling run."""
        runs.append([])
        for x in data:
            out = model(**x, return_dict=False)[0]
            runs[-1].append(out.detach().clone())
            model(**{**x, "hidden_states": x["hidden_states"] - 0.5 * out}, return_dict=False)

    model = build()
    _train(model, two_step_sampler, steps=10, decay_every=1, refresh_every=4)
    assert len(runs) == 3  # the recording, then refreshes at steps 4 and 8
    assert not torch.equal(runs[1][0], runs[0][0])  # re-run by the model as trained so far
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    with pytest.raises(ValueError, match="forward-loop callable"):
        _train(build(), data, steps=4, decay_every=1, refresh_every=2)


def test_smoothed_recipe_trains_and_round_trips(tiny_dit, tmp_path):
    build, data = tiny_dit
    model = build()
    recipe = replace(_recipe(), smooth=True, rules=(LayerRule("*.ff.*", smooth=False),))
    vqz.train_qat(model, recipe, data=data, steps=12, lr=1e-4, decay_every=2)
    layer = model.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, QuantLinear) and layer.smooth is not None
    assert not torch.equal(layer.smooth, torch.ones_like(layer.smooth))
    ff = [m for name, m in model.named_modules() if ".ff." in name and isinstance(m, QuantLinear)]
    assert ff and all(m.smooth is None for m in ff)  # the rule's layers keep their inputs
    vqz.save(model, tmp_path / "q")
    loaded = vqz.load(build(), tmp_path / "q")
    assert torch.equal(_out(loaded, data[0]), _out(model, data[0]))


def test_rotated_recipe_trains_and_round_trips(tiny_dit, tmp_path):
    build, data = tiny_dit
    model = build()
    vqz.train_qat(model, replace(_recipe(), rotate=True), data=data, steps=12, lr=1e-4, decay_every=2)
    block = model.transformer_blocks[0]
    assert block.ff.net[2].rotate and not block.attn1.to_q.rotate  # K = 128 and K = 32
    vqz.save(model, tmp_path / "q")
    loaded = vqz.load(build(), tmp_path / "q")
    assert loaded.transformer_blocks[0].ff.net[2].rotate
    assert torch.equal(_out(loaded, data[0]), _out(model, data[0]))


def _svd_recipe(rank=8):
    return replace(get_qat_preset("w4a4-svd-qat"), rank=rank)


def _ptq_svd(model, data, rank=8):
    """PTQ w4a4-svd of the Linear layers QAT trains (the patch-embedding Conv2d stays fp)."""
    config = replace(get_preset("w4a4-svd"), rank=rank, rules=(LayerRule(types=("Conv2d",), skip=True),))
    return vqz.quantize(model, config, calib=data)


def test_svd_qat_before_training_is_ptq_w4a4_svd(tiny_dit):
    build, data = tiny_dit
    model = build()
    vqz.train_qat(model, _svd_recipe(), data=data, steps=1, lr=0.0)  # lr 0: exported as it started
    ptq = _ptq_svd(build(), data)
    assert model.transformer_blocks[0].attn1.to_q.rank == 8
    for x in data:
        assert torch.equal(_out(model, x), _out(ptq, x))


def test_svd_qat_trains_its_kept_branch_resumes_and_round_trips(tiny_dit, tmp_path):
    build, data = tiny_dit
    fp, model = build(), build()
    log = vqz.train_qat(model, _svd_recipe(), data=data, steps=16, lr=1e-4, out=tmp_path / "run",
                        checkpoint_every=8)
    first, last = _epoch_means(log, 4)
    assert last < first and log.ranks == [0] * 16  # no decaying branch
    ptq = _ptq_svd(build(), data)
    layer, start = model.transformer_blocks[0].ff.net[2], ptq.transformer_blocks[0].ff.net[2]
    assert isinstance(layer, QuantLinear) and layer.rank == 8 and layer.smooth is not None
    assert not torch.equal(layer.lora_down, start.lora_down)  # the branch was trained
    assert {r["rank"] for r in vqz.summary(model) if r["status"] == "quantized"} == {8}
    for x in data:
        assert sqnr(_out(model, x), _out(fp, x)) > sqnr(_out(ptq, x), _out(fp, x))
    resumed = build()
    vqz.train_qat(resumed, _svd_recipe(), data=data, steps=16, lr=1e-4,
                  resume=tmp_path / "run" / "checkpoint-8")
    assert torch.allclose(_out(resumed, data[0]), _out(model, data[0]), atol=1e-5)
    vqz.save(model, tmp_path / "q")
    loaded = vqz.load(build(), tmp_path / "q")
    assert loaded.transformer_blocks[0].ff.net[2].rank == 8
    for x in data:
        assert torch.equal(_out(loaded, x), _out(model, x))


def test_svd_qat_refuses_a_rank_schedule(tiny_dit):
    build, data = tiny_dit
    for decay in ({"decay_every": 2}, {"decay_start": 4}, {"decay_fraction": 0.5}):
        with pytest.raises(ValueError, match="keeps its low-rank branch.*drop decay_every"):
            vqz.train_qat(build(), "w4a4-svd-qat", data=data, steps=8, **decay)


def test_frozen_parameters_stay_frozen_and_untouched(tiny_dit):
    build, data = tiny_dit
    model = build()
    norm_before = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    _train(model, data, steps=10, decay_every=1)
    for n, p in model.named_parameters():
        if n in norm_before:
            assert torch.equal(p, norm_before[n]) and p.requires_grad


@pytest.mark.parametrize("options", [{}, {"lr_schedule": "cosine", "records_per_step": 2}])
def test_resume_continues_exactly(tiny_dit, tmp_path, options):
    build, data = tiny_dit
    straight = build()
    _train(straight, data, steps=10, decay_every=1, out=tmp_path / "a", checkpoint_every=5, **options)
    resumed = build()
    log = _train(resumed, data, steps=10, decay_every=1, resume=tmp_path / "a" / "checkpoint-5",
                 **options)
    assert log.start == 5 and len(log.losses) == 5
    for x in data:
        assert torch.allclose(_out(resumed, x), _out(straight, x), atol=1e-5)


def test_resume_from_another_config_is_refused(tiny_dit, tmp_path):
    build, data = tiny_dit
    _train(build(), data, steps=5, decay_every=1, out=tmp_path / "a")
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"written by another run.*schedule"):
        _train(model, data, steps=10, decay_every=2, resume=tmp_path / "a" / "checkpoint-5")
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_teacher_of_another_architecture_is_refused(tiny_dit, tiny_denoisers):
    build, data = tiny_dit
    other = tiny_denoisers.FAMILIES["pixart"][0]()
    with pytest.raises(ValueError, match="teacher is a PixArtTransformer2DModel of another architecture"):
        _train(build(), data, teacher=other)


def test_teacher_outputs_are_the_targets(tiny_dit):
    build, data = tiny_dit
    teacher = build()
    with torch.no_grad():  # a different function of the same architecture, reachable by training
        teacher.transformer_blocks[1].ff.net[2].weight.mul_(3.0)
    model = build()
    vqz.train_qat(model, _recipe(), data=data, steps=32, lr=1e-3, decay_every=2, teacher=teacher)
    x = data[0]
    to_teacher = sqnr(_out(model, x), _out(teacher, x))
    assert to_teacher > sqnr(_out(build(), x), _out(teacher, x)) + 3
    assert to_teacher > sqnr(_out(model, x), _out(build(), x))


def test_ptq_entry_refuses_a_qat_preset(tiny_dit):
    with pytest.raises(ValueError, match="'w4a4-qat' is a quantization-aware training recipe"):
        vqz.quantize(tiny_dit[0](), "w4a4-qat")


@pytest.mark.parametrize("family", ["wan", "cogvideox", "pixart", "flux"])
def test_families_train_to_plain_quantized_layers(family, tiny_denoisers, tmp_path):
    build, inputs = tiny_denoisers.FAMILIES[family]
    data = [inputs(s) for s in range(4)]  # 4 distinct timesteps for the 4 clip ranges
    model = build()
    log = _train(model, data, steps=24, decay_every=2)
    first, last = _epoch_means(log, 4)
    assert log.ranks[-1] == 0 and last < first
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) >= 4
    vqz.save(model, tmp_path / "q")
    loaded = vqz.load(build(), tmp_path / "q")
    assert torch.equal(_out(loaded, data[0]), _out(model, data[0]))
