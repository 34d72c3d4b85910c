"""Convert a dataset into WebDataset shards + manifest.  `python launch/shard.py --help`."""

from segdist.cli.shard import run

if __name__ == "__main__":
    run()
