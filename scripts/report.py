"""Compare the runs of a sweep: writes report.md, report.csv and report.png into the multirun directory.

    python scripts/report.py multirun/2026-11-22/12-00-00
    python scripts/report.py multirun/2026-11-22/12-00-00 --tie-tolerance 0.28   # one digits val image

Runs that failed (no summary.json) are listed too, with the last error line of their log.
Exit status: 0 when the report was written, 2 when there is nothing to report (no such directory, or
no run in it).
"""

import argparse
import sys

from qlightning.report import NoRunsError, collect_failed_runs, collect_runs, failed_summary, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra sweep directory (holds one numbered directory per run)")
    parser.add_argument("--tie-tolerance", type=float, default=0.0, metavar="POINTS",
                        help="name every run within POINTS accuracy points of the best as tied (default 0: equal at "
                             "the 2 decimals summary.json stores; 100 / validation-set size = one image)")
    args = parser.parse_args(argv)
    if args.tie_tolerance < 0:
        parser.error(f"--tie-tolerance is in accuracy points and cannot be negative, got {args.tie_tolerance}")
    try:
        paths = write_report(args.multirun_dir, tie_tolerance=args.tie_tolerance)
    except (NoRunsError, FileNotFoundError, NotADirectoryError) as exc:
        # One line, no traceback: these are the caller's input, not a bug.
        print(f"report.py: {exc}", file=sys.stderr)
        return 2
    finished, failed = collect_runs(args.multirun_dir), collect_failed_runs(args.multirun_dir)
    line = f"{len(finished)} runs reported"
    print(line + (f", {len(failed)} failed: {failed_summary(failed)}" if failed else ", none failed"))
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
