"""segdist: distributed semantic segmentation training with exact evaluation.

In Python: `segdist.train(recipe, overrides, resume=...)`, `segdist.evaluate(recipe, checkpoint=...)`
and `segdist.predict(recipe, images, checkpoint=..., out=...)` (segdist.api, docs/python-api.md).
"""

from segdist.api import NAMES

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "predict", "__version__"]


def __getattr__(name: str):
    # The API's modules (and torch) are imported on first use, so `import segdist` stays cheap.
    if name in NAMES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
