"""Applications on top of everything else: the run report (``vaelab report``) and the interactive
latent-space explorer (``vaelab explore``). Nothing below imports from here."""

from .report import build_report, health_checks, render_html, write_report

__all__ = ["build_report", "health_checks", "render_html", "write_report"]
