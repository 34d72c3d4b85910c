"""Predict images:  python launch/predict.py RECIPE --checkpoint PATH IMAGE_OR_GLOB... --out DIR

The same as the console script `segdist-predict` and `python -m segdist.cli.predict`: see
segdist/cli/predict.py.
"""

from segdist.cli.predict import run

if __name__ == "__main__":
    run()
