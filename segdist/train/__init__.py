"""Training: the run's setup (`setup`), the loop (`trainer`), one optimizer step (`step`), the
trainer's counters (`state`), and `train`, the entry point (`run`)."""

from segdist.train.run import train

__all__ = ["train"]
