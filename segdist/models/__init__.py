"""Models: `build_model` makes the recipe's architecture (segdist/models/build.py: any
segmentation-models-pytorch architecture with any encoder it accepts, or our own `unet` /
`segnet`) and `prepare_model` applies the scale options; `load_trained` (trained.py) is the one
way a trained model comes back from a checkpoint; `ModelEMA` (ema.py) averages the weights."""

from segdist.models.build import (OURS, build_model, check_batch_norms_train, prepare_model, smp_architectures,
                                  state_shapes)
from segdist.models.trained import TrainedInfo, load_trained, resolve_classes

__all__ = ["OURS", "TrainedInfo", "build_model", "check_batch_norms_train", "load_trained", "prepare_model",
           "resolve_classes", "smp_architectures", "state_shapes"]
