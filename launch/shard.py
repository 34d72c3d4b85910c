"""Convert a dataset into WebDataset shards + manifest.  `python launch/shard.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segdist.data.convert import build_parser  # noqa: E402
from segdist.errors import run_cli  # noqa: E402


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_cli(main)
