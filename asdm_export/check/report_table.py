"""The check report as a table for the terminal: one row per graph and backend."""

from __future__ import annotations

from rich.table import Table

from ..console import fmt_bytes
from .accuracy import latent_of, own_bounds


def check_table(report: dict, title: str = "accuracy check"):
    """One row per graph and backend: size, latency, worst-case errors, verdict."""
    tol = report["tolerance"]
    table = Table(title=f"{title} (tolerance {report['tolerance_preset']}: max_abs <= {tol['max_abs']:g}, "
                        f"rel_l2 <= {tol['rel_l2']:g}, cosine >= {tol['min_cosine']:g})")
    for col in ("graph", "size", "backend", "latency @opt", "torch @opt", "max abs", "rel L2", "cosine", "verdict"):
        table.add_column(col, justify="left" if col in ("graph", "backend", "verdict") else "right")
    for g in report["graphs"]:
        for backend, b in g["backends"].items():
            w = b["worst"]
            table.add_row(
                g["name"], fmt_bytes(g["bytes"]), backend + own_bounds(b),
                _ms(b["latency_ms_at_opt"]), _ms(g["torch_latency_ms_at_opt"]),
                f"{w['max_abs']:.2e}", f"{w['rel_l2']:.2e}", f"{w['cosine']:.6f}",
                "[green]PASS[/]" if b["passed"] else "[red]FAIL[/]",
            )
    return table


def e2e_lines(report: dict) -> list[str]:
    """The end-to-end verdict per backend, in words (the table has the graphs only)."""
    e2e = report.get("e2e", {})
    if "skipped" in e2e:
        return [f"end to end: skipped ({e2e['skipped']})"]
    return [f"end to end on {name}{own_bounds(b)}{latent_of(b)}: {len(e2e['prompts'])} prompts x {e2e['steps']} "
            f"steps, image PSNR "
            f"{b['image_psnr']:.1f} dB, SSIM {b['image_ssim']:.4f} against the PyTorch pipeline (bound "
            f"{e2e['min_image_psnr']:g} dB): {'PASS' if b['passed'] else 'FAIL'}"
            for name, b in e2e["backends"].items()]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"
