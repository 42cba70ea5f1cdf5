"""Compare the runs of a sweep: writes report.md, report.csv and report.png into the multirun directory.

    python scripts/report.py multirun/2026-11-22/12-00-00
"""

import argparse
import sys

from qlightning.report import write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra sweep directory (holds one numbered directory per run)")
    args = parser.parse_args(argv)
    for path in write_report(args.multirun_dir).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
