"""``report.html``: the check report as one self-contained page (tables, and the PNGs embedded as base64
data URIs), readable offline and attachable to a CI run as a single file."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .accuracy import latent_of, own_bounds

CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.pass{color:#080;font-weight:bold}.fail{color:#c00;font-weight:bold}img{border:1px solid #ddd;max-width:100%}
code{background:#f5f5f5;padding:2px 4px;font-size:12px;word-break:break-all}figure{margin:10px 0 24px}"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, fmt=".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value in (float("inf"), float("-inf")) or value != value:
        return str(value)
    return format(value, fmt)


def _verdict(ok: bool) -> str:
    return '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _metrics(m: dict | None) -> list[str]:
    if not m:
        return ["-"] * 5
    return [_num(m["max_abs"]), _num(m["rel_l2"]), _num(m["cosine"], ".7f"), _num(m["psnr"], ".1f"),
            str(m["nonfinite"])]


def render(report: dict, pictures: dict[str, str], folder: Path) -> str:
    tol = report["tolerance"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>asdm-export check</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Accuracy check {_verdict(report['passed'])}</h1>",
             f"<p>bundle <code>{_e(report['bundle'])}</code>, precision {_e(report['precision'])}; tolerance "
             f"{_e(report['tolerance_preset'])}: max abs &le; {tol['max_abs']:g}, rel L2 &le; {tol['rel_l2']:g}, "
             f"cosine &ge; {tol['min_cosine']:g}, no NaN/Inf"
             + (f"; per output: <code>{_e(report['tolerance_overrides'])}</code>" if report.get("tolerance_overrides")
                else "") + "</p>"]
    if report.get("changed_files"):
        parts.append(f"<p class='fail'>changed since export: {_e(', '.join(report['changed_files']))}</p>")
    parts.append("<h2>Per graph (worst case over all cases and outputs)</h2>")
    rows = []
    for g in report["graphs"]:
        for b, r in g["backends"].items():
            rows.append([_e(g["name"]), _e(b + own_bounds(r)), f"{g['cases']['random']} + {g['cases']['recorded']}",
                         *_metrics(r["worst"]), _num(r["worst_recorded"]["rel_l2"]) if r["worst_recorded"] else "-",
                         _num(r["latency_ms_at_opt"], ".1f"), _verdict(r["passed"])])
    parts.append(_table(["graph", "backend", "cases (random + recorded)", "max abs", "rel L2", "cosine", "PSNR dB",
                         "NaN/Inf", "rel L2 (recorded)", "ms @opt", "verdict"], rows, left=2))
    parts.append("<h2>Cases</h2>")
    for g in report["graphs"]:
        for b, r in g["backends"].items():
            rows = []
            for p in r["points"]:
                where = ", ".join(f"{k}={v}" for k, v in p["dims"].items())
                if "prompt" in p:
                    where += f"; prompt {p['prompt']}"
                if "step" in p:
                    where += f", step {p['step']}, t={p['timestep']:g}"
                for name, m in p["outputs"].items():
                    rows.append([str(p["index"]), _e(p["kind"]), _e(where), _e(name), *_metrics(m),
                                 _verdict(m["passed"])])
            parts.append(f"<h3>{_e(g['name'])} on {_e(b + own_bounds(r))}</h3>")
            parts.append(_table(["#", "kind", "shape / step", "output", "max abs", "rel L2", "cosine", "PSNR dB",
                                 "NaN/Inf", "verdict"], rows, left=4))
        parts.append(f"<p>replay (same verdict): <code>{_e(g['replay']['exact'])}</code><br>replay with polygraphy's "
                     f"comparators only (max abs, cosine, NaN/Inf): <code>{_e(g['replay']['builtin'])}</code></p>")
    e2e = report.get("e2e", {})
    parts.append("<h2>End to end</h2>")
    if "skipped" in e2e:
        parts.append(f"<p>skipped: {_e(e2e['skipped'])}</p>")
    else:
        parts.append(f"<p>{len(e2e['prompts'])} prompts, {e2e['steps']} steps, seed {e2e['seed']}, guidance "
                     f"{e2e['guidance']}; pass: image PSNR &ge; {e2e['min_image_psnr']:g} dB and finite latents.</p>")
        rows = []
        for b, r in e2e["backends"].items():
            for i, p in enumerate(r["prompts"]):
                rows.append([_e(b + latent_of(r)), _e(p["prompt"]), _num(p["image_psnr"], ".2f"),
                             _num(p["image_ssim"], ".5f"),
                             str(p["image_max_abs"]), _num(p["final_latent"]["rel_l2"]),
                             _num(max(p["latent_rel_l2_per_step"]))])
            rows.append([_e(b), "<b>verdict</b>" + (f" (image PSNR &ge; {r['min_image_psnr']:g} dB: "
                                                     f"{_e(r['tolerance_preset'])} tolerances)"
                                                     if r.get("tolerance_preset") else ""),
                         "", "", "", "", _verdict(r["passed"])])
        parts.append(_table(["backend", "prompt", "image PSNR dB", "SSIM", "max |px diff|", "final latent rel L2",
                             "worst step rel L2"], rows, left=2))
        for name in ("e2e_latent_error.png", "e2e_grid.png"):
            if name in pictures:
                parts.append(_img(folder / name, pictures[name]))
        parts.append("<h2>Quality cost of the accelerations (PyTorch; not part of the verdict)</h2>")
        cost = e2e.get("acceleration_cost", {})
        if not cost:
            parts.append("<p>this bundle uses no inheritance schedule or UNet switching.</p>")
        rows = [[_e(n), _e(c["what"]), f"{c['full_steps'][0]} / {c['full_steps'][1]}", _num(c["image_psnr"], ".2f"),
                 _num(c["image_ssim"], ".4f")] for n, c in cost.items()]
        if rows:
            parts.append(_table(["acceleration", "compared", "full steps (accelerated / baseline)",
                                 "image PSNR dB", "SSIM"], rows, left=2))
        for n in cost:
            if f"cost_{n}.png" in pictures:
                parts.append(_img(folder / f"cost_{n}.png", pictures[f"cost_{n}.png"]))
    # Lets a headless browser (the report test, `make report-screenshot`) read back how many images decoded.
    parts.append("<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.imagesLoaded="
                 "i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length})</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict, pictures: dict[str, str], path: Path) -> None:
    path.write_text(render(report, pictures, path.parent), encoding="utf-8")
