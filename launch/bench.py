"""Benchmarks:  python launch/bench.py {data,feed,metric,step,optim,scale,eval,gpu} [...]   (--help on each)

The same as the console script `segdist-bench` and `python -m segdist.cli.bench`: see
segdist/cli/bench.py.
"""

from segdist.cli.bench import run

if __name__ == "__main__":
    run()
