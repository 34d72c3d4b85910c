"""Export to ONNX:  python launch/export.py RECIPE --checkpoint PATH --out model.onnx [--opset N]
or as a folder others load without segdist:  ... --format hf --out DIR

The same as the console script `segdist-export` and `python -m segdist.cli.export`: see
segdist/cli/export.py.
"""

from segdist.cli.export import run

if __name__ == "__main__":
    run()
