"""Run reports: `report.md`, a self-contained `report.html` and `plots/*.png` from a run folder.

    from alignguard.report import render_report
    render_report("runs/compare1")          # writes runs/compare1/report.md, report.html, plots/

Reads results JSON, YAML and safetensors only; it never imports training code.
"""

from .plots import pareto_front
from .render import render_report, to_html, to_markdown

__all__ = ["pareto_front", "render_report", "to_html", "to_markdown"]
