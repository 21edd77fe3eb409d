"""`mmpt-report`: plots and a results table from runs' metrics.jsonl, without a W&B server.

  mmpt-report runs/demo --out report/                      one run
  mmpt-report runs/a runs/b --out report/                  runs overlaid, one table row each
  mmpt-report multirun/2026-01-01_12-00-00 --out report/   a Hydra multirun: one row per job, with its overrides

Writes DIR/<metric>.png (each loss, lr, throughput, MFU when logged, every eval metric; runs overlaid) and
DIR/report.md (the table of final and best metrics, then the figures). The table is also printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpt.tools.run_report import ReportError, find_runs, mark_swept, plotted_keys, summary_table

USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpt-report", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run dir (holds metrics.jsonl), or a multirun / sweep dir whose jobs are run dirs")
    parser.add_argument("--out", required=True, help="output directory for the PNGs and report.md (created)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (100: 640x400 pixels)")
    return parser


def write_report(run_dirs: list[str], out: Path, dpi: int = 100) -> Path:
    """Plots and report.md for the runs; returns report.md's path. Raises ReportError / MissingMatplotlib."""
    from mmpt.tools.report_plots import plot_metric, require_matplotlib

    require_matplotlib()
    runs = [run for d in run_dirs for run in find_runs(Path(d))]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # runs/x and other/x: name them by their path instead
        for run in runs:
            run.name = str(run.path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create --out {out}: {exc}") from None
    common = mark_swept(runs)
    table = summary_table(runs)
    figures = [plot_metric(key, runs, out, dpi) for key in plotted_keys(runs)]
    lines = ["# mmpt report", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), "", table]
    if common:
        lines += ["Overrides shared by all runs above: " + " ".join(f"`{o}`" for o in common), ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(table, end="")
    print(f"wrote {len(figures)} plots and {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmpt.tools.report_plots import MissingMatplotlib

    try:
        write_report(args.runs, Path(args.out), args.dpi)
    except (ReportError, MissingMatplotlib) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
