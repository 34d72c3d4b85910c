"""Training: the run's setup (`setup`), the loop (`trainer`), one optimizer step (`step`), the
trainer's counters (`state`), and `train`, the entry point (`run`). Calling this package calls
`train`: `segdist.train(recipe, overrides, resume=...)` (segdist.api)."""

from segdist.api import make_callable
from segdist.train.run import train

__all__ = ["train"]

make_callable(__name__, train)
