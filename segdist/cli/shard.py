"""Convert a dataset into WebDataset shards + manifest.  `python launch/shard.py --help`."""

from __future__ import annotations

from segdist.data.convert import build_parser
from segdist.errors import run_cli


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def run() -> None:
    """The `segdist-shard` console script (and `launch/shard.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.shard ...
    run()
