"""Wall time and peak GPU memory of quantizing a full-size FLUX transformer with vqz.

Builds FluxTransformer2DModel with the FLUX.1-dev config (19 double + 38 single blocks, 3072 wide)
and random bf16 weights (no download needed: calibration cost does not depend on the weight values),
calibrates it on random 1024x1024-sized inputs at timesteps spread over the trajectory, and reports
the time of the statistics pass, of each layer's quantization (smoothing search, SVD, rounding) and
in total, plus peak GPU memory.

    python samples/bench_flux_calibration.py --preset w4a4-svd --json flux.json
    python samples/bench_flux_calibration.py --small   # a 1+1-block smoke test, CPU is fine
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

import vqz
import vqz.api
from vqz.eval.images import sqnr as sqnr_db

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SMALL = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
             axes_dims_rope=(4, 6, 6))


def flux_inputs(cfg: dict, batch: int, side: int, text_tokens: int, seed: int, device, dtype):
    """Forward kwargs of FluxTransformer2DModel for `batch` images of side x side latent tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return dict(hidden_states=randn(batch, side * side, cfg["in_channels"]),
                encoder_hidden_states=randn(batch, text_tokens, cfg["joint_attention_dim"]),
                pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
                img_ids=img_ids.to(device, dtype), txt_ids=torch.zeros(text_tokens, 3).to(device, dtype),
                guidance=torch.full((batch,), 3.5).to(device, dtype))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="w4a4-svd")
    p.add_argument("--small", action="store_true", help="1 double + 1 single block, narrow")
    p.add_argument("--side", type=int, default=64, help="latent tokens per side (64: 1024x1024)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--prompts", type=int, default=2, help="calibration input sets")
    p.add_argument("--timesteps", type=int, default=4, help="timesteps per input set")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = SMALL if args.small else FLUX_DEV
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    start = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg).eval()
    torch.set_default_dtype(default_dtype)
    build_s = time.perf_counter() - start
    params = sum(t.numel() for t in model.parameters())

    batches = [flux_inputs(cfg, 1, args.side, args.text_tokens, seed, device, dtype)
               for seed in range(args.prompts)]
    timesteps = torch.linspace(1.0, 1.0 / args.timesteps, args.timesteps).tolist()

    def forward_loop(m):
        for kwargs in batches:
            for t in timesteps:
                m(timestep=torch.full((1,), t, device=device, dtype=dtype), **kwargs)

    check = dict(batches[0], timestep=torch.full((1,), 0.5, device=device, dtype=dtype))
    with torch.no_grad():
        reference = model(**check).sample.float()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    layer_seconds = {}
    stats_seconds = []
    quantize_layer, collect_input_stats = vqz.api.quantize_layer, vqz.api.collect_input_stats

    def timed_layer(module, plan, cfg_, stats=None):
        sync()
        t0 = time.perf_counter()
        out = quantize_layer(module, plan, cfg_, stats)
        sync()
        layer_seconds[plan.name] = time.perf_counter() - t0
        return out

    def timed_stats(*a, **kw):
        sync()
        t0 = time.perf_counter()
        out = collect_input_stats(*a, **kw)
        sync()
        stats_seconds.append(time.perf_counter() - t0)
        return out

    vqz.api.quantize_layer, vqz.api.collect_input_stats = timed_layer, timed_stats
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    vqz.quantize(model, args.preset, calib=forward_loop)
    sync()
    total_s = time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    with torch.no_grad():
        out = model(**check).sample.float()
    sqnr = sqnr_db(out, reference)

    by_kind = defaultdict(list)
    for name, seconds in layer_seconds.items():
        by_kind[name.split(".")[0] + "." + name.split(".", 2)[-1]].append(seconds)
    rows = sorted(((k, len(v), statistics.mean(v), max(v)) for k, v in by_kind.items()),
                  key=lambda r: -r[1] * r[2])
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch=torch.__version__, preset=args.preset, params=params,
                  layers=len(layer_seconds), calibration_forwards=len(batches) * len(timesteps),
                  image_tokens=args.side ** 2, text_tokens=args.text_tokens, build_s=build_s,
                  stats_pass_s=sum(stats_seconds), layers_s=sum(layer_seconds.values()),
                  total_s=total_s, peak_gib=peak_gib, sqnr_db_vs_bf16=sqnr,
                  per_layer_kind={k: dict(count=n, mean_s=m, max_s=x) for k, n, m, x in rows})
    print(f"{'layer kind':40s} {'count':>5s} {'mean s':>8s} {'max s':>8s}")
    for k, n, m, x in rows:
        print(f"{k:40s} {n:5d} {m:8.3f} {x:8.3f}")
    print(f"\n{result['device']}, {params / 1e9:.2f}B parameters, {result['layers']} quantized layers, "
          f"{result['calibration_forwards']} calibration forwards of {args.side ** 2}+"
          f"{args.text_tokens} tokens")
    print(f"statistics pass {result['stats_pass_s']:.1f} s, layers {result['layers_s']:.1f} s, "
          f"total {total_s:.1f} s ({total_s / 60:.2f} min); peak GPU memory {peak_gib:.1f} GiB; "
          f"output SQNR vs bf16 {sqnr:.1f} dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
