"""The Python API: `segdist.train`, `segdist.evaluate` and `segdist.predict`, the functions the
command lines call (docs/python-api.md).

    import segdist
    metrics = segdist.train("recipes/shapes_unet.toml", ["train.steps=200"], resume="auto")
    scores = segdist.evaluate("recipes/shapes_unet.toml", checkpoint="runs/shapes_unet")
    files = segdist.predict("recipes/shapes_unet.toml", ["photos/"], checkpoint="runs/shapes_unet", out="pred")

- `segdist.train` is segdist.train.run.train: the final val metrics (None when a stop signal ended it);
- `segdist.evaluate` is segdist.evaluate.evaluate_checkpoint: the metrics dict of `--out`;
- `segdist.predict` is segdist.predict.files.predict_files: the files this process wrote.
Each takes a recipe path or a loaded `segdist.recipe.Recipe`, the `--set` strings as `overrides`,
and the rest of its command's options as keyword arguments. A user error raises
`segdist.errors.UserError` with the line the command prints; nothing exits.

How the names are made. `train`, `evaluate` and `predict` were already modules of the package
(segdist/train/, segdist/evaluate.py, segdist/predict/), and the import system sets a package's
attribute to its submodule whenever the submodule is imported: a function `segdist.train` (set
eagerly, or lazily by a module `__getattr__`) would be replaced by the module as soon as anything
ran `import segdist.train.setup`, so `segdist.train(...)` would work or fail depending on what
was imported first. Renaming the modules would break every `from segdist.train.setup import ...`.
So the three modules are callable (`make_callable`): calling the module calls its entry point,
and `segdist.train.setup`, `from segdist.predict import load_predictor` and the rest stay as they
were, whatever was imported before. `import segdist` stays cheap: the package imports them (and
torch) on first use (segdist/__init__.py). This module itself imports no other segdist module, so
the modules it makes callable can import it without a cycle.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Callable

NAMES = ("train", "evaluate", "predict")
"""The callable modules, each `segdist.<name>`."""


class EntryModule(types.ModuleType):
    """A module that can be called: the call goes to its entry point (`make_callable`)."""

    def __call__(self, *args, **kwargs):
        return self._entry(*args, **kwargs)


def make_callable(module_name: str, entry: Callable) -> None:
    """Make the module `module_name` (from its own body: `make_callable(__name__, entry)`) call
    `entry` when it is called, with `entry`'s signature for `inspect` and `help`."""
    module = sys.modules[module_name]
    module.__class__ = EntryModule
    module._entry = entry
    module.__signature__ = inspect.signature(entry)
