"""Evaluate a checkpoint exactly:  accelerate launch [...] launch/eval.py RECIPE --checkpoint PATH [--split NAME] [--out FILE.json]

The same as the console script `segdist-eval` and `python -m segdist.cli.eval`: see
segdist/cli/eval.py.
"""

from segdist.cli.eval import run

if __name__ == "__main__":
    run()
