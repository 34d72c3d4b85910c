"""Benchmarks:  python launch/bench.py {data,feed,metric,step,optim,scale,eval,gpu} [...]   (--help on each)

`data` compares training-input throughput on Cityscapes-size frames: WebDataset shards vs a
folder of files, JPEG- vs PNG-stored shards. `feed` gives each shipped recipe's CPU ms per training
sample on the storage its header names (and on the storage before), and the cores a GPU needs. `metric` times the confusion-matrix update against
the per-class numpy loop our users evaluated with and torchmetrics. `step` times segdist's train step against a bare
PyTorch (DDP) loop at 1 and 2 processes. `scale` compares training samples/s at 1 and 2
processes on the real training path. `eval` times evaluation in whole / slide / slide + flip
mode and the share spent counting. `gpu` runs the CUDA checks. See BENCHMARKS.md. Each
benchmark is a module of the segdist.bench package; this script only parses and calls it.
"""

from __future__ import annotations

from segdist.errors import run_cli


def main(argv=None) -> int:
    from segdist.bench import build_parser

    args = build_parser().parse_args(argv)
    return args.run(args)


def run() -> None:
    """The `segdist-bench` console script (and `launch/bench.py`)."""
    run_cli(main)


if __name__ == "__main__":  # accelerate launch -m segdist.cli.bench ...
    run()
