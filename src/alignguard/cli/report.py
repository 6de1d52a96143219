"""`alignguard report`: render a run folder into report.md, a self-contained report.html and plots/*.png.

    alignguard report runs/compare1                 # writes into the run folder
    alignguard report runs/base_eval --out reports/base

Understands `alignguard compare` folders (results table with 95% CIs, drift bars, task vs refusal Pareto
plot, per-category heat map, Fisher spectrum and chosen m, scaling law when `scaling/scaling.json` exists,
config and package versions) and `alignguard eval` folders (rates and per-category refusal).
"""

from __future__ import annotations

import argparse

COMMAND_HELP = "render report.md / report.html / plots from a compare or eval run folder"


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="alignguard report", description=__doc__)
    parser.add_argument("run_dir", help="Run folder made by `alignguard compare` or `alignguard eval --out`.")
    parser.add_argument("--out", default=None, help="Output folder (default: the run folder).")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help=COMMAND_HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    make_parser(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    # Imported here so `alignguard -h` does not pay for matplotlib.
    from alignguard.report import render_report

    try:
        md = render_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(f"wrote {md.parent / 'report.html'}, {md.parent / 'plots'}/")
    print(md)
    return 0
