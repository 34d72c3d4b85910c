"""Prediction: one image at a time from a model loaded once (`frame`: `load_predictor`,
`predict_frame`, `predict_probabilities`, `read_image`), and image files predicted into a folder
(`files`: `predict_files`, what `launch/predict.py` runs). Calling this package calls
`predict_files`: `segdist.predict(recipe, images, checkpoint=..., out=...)` (segdist.api)."""

from segdist.api import make_callable
from segdist.predict.files import predict_files
from segdist.predict.frame import (DEFAULT_THRESHOLD, Predictor, load_predictor, predict_frame, predict_probabilities,
                                   read_image)

__all__ = ["DEFAULT_THRESHOLD", "Predictor", "load_predictor", "predict_files", "predict_frame",
           "predict_probabilities", "read_image"]

make_callable(__name__, predict_files)
