"""`rolevec report RUN_DIR`: rebuild a run's report from its files alone (no model is loaded)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report",
        help="write report.html, report.md, tables/*.csv and figures/*.png for a run folder",
        description="Build the report of a run folder from its records.jsonl (required) and, when present, "
        "sweep.jsonl, selection.json, vectors.safetensors, interpret.json and manifest.json.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `rolevec run` or `evaluate`")
    parser.add_argument("--force", action="store_true", help="overwrite an existing report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import summary_lines, write_report
    from .common import plain_warnings

    with plain_warnings():
        files = write_report(args.run_dir, force=args.force)
    for line in summary_lines(files):
        print(line)
    return 0
