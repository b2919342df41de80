"""The outputs of `vqz eval images`: a printed table, metrics.json and a self-contained report.html
(metrics table with skipped metrics and their reasons, then reference and test thumbnails side by
side, embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

# name: (label, which way is better, paired or set metric)
METRICS = {
    "psnr": ("PSNR (dB)", "higher", "paired, mean over pairs"),
    "ssim": ("SSIM", "higher", "paired, mean over pairs"),
    "lpips": ("LPIPS", "lower", "paired, mean over pairs"),
    "fid": ("FID", "lower", "unpaired sets"),
    "kid": ("KID", "lower", "unpaired sets, mean ± std over subsets"),
    "clip_reference": ("CLIP score, reference", "higher", "image vs its prompt, mean"),
    "clip_test": ("CLIP score, test", "higher", "image vs its prompt, mean"),
}
MAX_PAIRS_SHOWN, THUMBNAIL_SIDE = 64, 160


def _value_text(key: str, record: dict) -> str:
    if "skipped" in record:
        return "skipped"
    if key == "kid":
        return f"{record['value']:.5f} ± {record['std']:.5f}"
    return f"{record['value']:.{2 if key == 'psnr' else 4}f}"


def _present(metrics: dict) -> list:
    """METRICS items of the metrics this result has (CLIP scores only where prompts are known)."""
    return [(key, entry) for key, entry in METRICS.items() if key in metrics]


def _skip_reasons(metrics: dict) -> dict[str, str]:
    """{"FID/KID": reason, ...}: the skipped metrics, those sharing a reason under one label."""
    by_reason: dict[str, list[str]] = {}
    for key, record in metrics.items():
        if "skipped" in record:
            by_reason.setdefault(record["skipped"], []).append(METRICS[key][0])
    return {"/".join(labels): reason for reason, labels in by_reason.items()}


def format_table(result: dict) -> str:
    """The metrics as a text table, then one line per skipped metric with its reason."""
    lines = [f"{result['count']} image pairs: {result['test']} (test) vs {result['ref']} "
             f"(reference); FID/KID features: {result['features']}",
             f"{'metric':11s}{'value':>20s}  {'better':7s}kind"]
    for key, (label, better, kind) in _present(result["metrics"]):
        lines.append(f"{label:11s}{_value_text(key, result['metrics'][key]):>20s}  {better:7s}{kind}")
    lines += [f"{labels} skipped: {reason}" for labels, reason in _skip_reasons(result["metrics"]).items()]
    return "\n".join(lines)


def _thumbnail(path: Path) -> str:
    """A data URI (PNG, base64) of the image scaled so its longer side is THUMBNAIL_SIDE: small
    images are enlarged with nearest neighbour so their pixels stay visible."""
    from PIL import Image

    with Image.open(path) as image:
        scale = THUMBNAIL_SIDE / max(image.size)
        size = tuple(max(1, round(side * scale)) for side in image.size)
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
        buffer = io.BytesIO()
        image.convert("RGB").resize(size, resample).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shown_pairs(pairs: list) -> list:
    """At most MAX_PAIRS_SHOWN pairs, evenly spaced over the sorted list so the grid spans the set."""
    n = len(pairs)
    return pairs if n <= MAX_PAIRS_SHOWN else [pairs[i * n // MAX_PAIRS_SHOWN]
                                               for i in range(MAX_PAIRS_SHOWN)]


def render_html(result: dict) -> str:
    esc = html.escape
    metrics = result["metrics"]
    rows = "".join(f"<tr><td>{label}</td><td>{_value_text(key, metrics[key])}</td><td>{better}</td>"
                   f"<td>{kind}</td></tr>" for key, (label, better, kind) in _present(metrics))
    skipped = "".join(f"<li><b>{esc(labels)} skipped:</b> {esc(reason)}</li>"
                      for labels, reason in _skip_reasons(metrics).items())
    paired = [key for key in ("psnr", "ssim", "lpips") if "skipped" not in metrics[key]]
    shown = _shown_pairs(result["pairs"])
    ref, test = Path(result["ref"]), Path(result["test"])
    cells = "".join(
        f"<tr><td>{esc(p['ref'])}<br>{esc(p['test'])}</td>"
        f"<td><img src='{_thumbnail(ref / p['ref'])}'></td>"
        f"<td><img src='{_thumbnail(test / p['test'])}'></td>"
        f"<td>{'<br>'.join(f'{METRICS[k][0]} {p[k]:.4g}' for k in paired)}</td></tr>"
        for p in shown)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vqz eval images</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}</style></head><body>
<h1>Image quality: test vs reference</h1>
<p>{result['count']} image pairs, paired by sorted file name. Reference: <code>{esc(str(ref))}</code>;
test: <code>{esc(str(test))}</code>; FID/KID features: <code>{esc(str(result['features']))}</code>.</p>
<table><tr><th>metric</th><th>value</th><th>better</th><th>kind</th></tr>{rows}</table>
<ul>{skipped}</ul>
<h2>Pairs ({len(shown)} of {result['count']} shown)</h2>
<table><tr><th>file</th><th>reference</th><th>test</th><th>paired metrics</th></tr>{cells}</table>
</body></html>
"""


def write_report(result: dict, out) -> tuple[Path, Path]:
    """Write out/metrics.json (the whole result) and out/report.html; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "metrics.json", out / "report.html"
    json_path.write_text(json.dumps(result, indent=2))
    html_path.write_text(render_html(result))
    return json_path, html_path
