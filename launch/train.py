"""Train a recipe:  accelerate launch [--multi_gpu --num_processes N] launch/train.py RECIPE [--set k=v ...] [--resume [auto]]

The same as the console script `segdist-train` and `python -m segdist.cli.train`: see
segdist/cli/train.py.
"""

from segdist.cli.train import run

if __name__ == "__main__":
    run()
