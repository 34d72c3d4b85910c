"""Benchmarks behind `launch/bench.py`. Each is a subcommand in a module of its own, added by its
`add_parser(sub)`, which sets the `run(args)` it calls; every one prints its figures beside a
baseline measured in the same run (see BENCHMARKS.md).

- data: training-input throughput, shards vs a folder of files, JPEG vs PNG;
- feed: CPU ms per training sample of each recipe on its storage (and before it), and the cores a GPU needs;
- metric: the confusion-matrix update vs our users' per-class numpy loop and torchmetrics;
- step: segdist's train step vs a bare PyTorch (DDP) loop, at 1 and 2 processes;
- optim: the train step under each optim.implementation (fused, foreach, for-loop);
- scale: training samples/s of the real training path at 1 vs 2 processes;
- eval: evaluation samples/s of whole / slide / slide + flip, and the share spent counting;
- gpu: the CUDA checks (step ratio with channels_last and torch.compile, MFU, exact eval).
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from segdist.bench import data, eval, feed, gpu, metric, optim, scale, step

    parser = argparse.ArgumentParser(description="segdist benchmarks; each prints a table.")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for module in (data, feed, metric, step, optim, scale, eval, gpu):
        module.add_parser(sub)
    return parser

