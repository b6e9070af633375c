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
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild an existing report (its old tables and figures are replaced too)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.report import load_run, summary_lines, write_report
    from ..core.outdir import check_run_folder, prepare
    from ..errors import RolevecError

    data = load_run(args.run_dir)  # the run's files are checked before the old report goes aside
    root = check_run_folder(data.run_dir, "report", force=args.force)
    if not args.force:
        for name in ("report.html", "report.md"):
            if (root / name).exists():
                raise RolevecError(f"{root / name} already exists: pass --force to rebuild the report")
    with prepare(root, "report", force=args.force):
        files = write_report(root, force=True, data=data)
    for line in summary_lines(files):
        print(line)
    return 0
