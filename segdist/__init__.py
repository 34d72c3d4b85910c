"""segdist: distributed semantic segmentation training with exact evaluation."""

__version__ = "0.1.0"
