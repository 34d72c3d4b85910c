"""TensorBoard on the main process: scalars, text, figures, image strips and hyperparameters as
TensorBoard reads them."""

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from segdist import report
from segdist.tblog import TensorBoard


def test_the_main_process_writes_what_tensorboard_reads(tmp_path):
    tb = TensorBoard(tmp_path, enabled=True)
    tb.scalar("train/loss", 0.5, 3)
    tb.scalar("train/skipped", None, 3)  # nothing to log: no event
    tb.text("run/precision", "fp32: no native bf16", 0)
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    mask = np.ones((4, 5), dtype=np.uint8)
    tb.image("val/sample_0", report.strip(image, mask, mask, [[0, 0, 0], [9, 9, 9]], 255), 3)
    tb.image("val/confusion", np.zeros((6, 7, 3), dtype=np.uint8), 3)
    tb.hparams({"train.steps": 4, "data.root": "data/shapes", "model.sync_bn": False}, metrics=("val/mIoU",))
    tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.5)]
    assert "train/skipped" not in events.Tags()["scalars"]
    assert events.Tensors("run/precision/text_summary")[0].tensor_proto.string_val == [b"fp32: no native bf16"]
    strip = events.Images("val/sample_0")[0]
    # input | truth | prediction side by side, 4x5 panels upscaled 64x to be readable, 4 px gaps
    assert (strip.width, strip.height) == (3 * 320 + 2 * 4, 256)
    figure = events.Images("val/confusion")[0]
    assert (figure.width, figure.height) == (7, 6)
    # The HPARAMS dashboard: the values of this run, against its val/mIoU scalar.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.steps"].number_value == 4 and start.hparams["data.root"].string_value == "data/shapes"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/mIoU"]


def test_other_ranks_write_nothing(tmp_path):
    tb = TensorBoard(tmp_path, enabled=False)
    tb.scalar("train/loss", 1.0, 1)
    tb.text("x", "y", 1)
    tb.hparams({"a": 1}, metrics=("val/mIoU",))
    tb.flush()
    tb.close()
    assert not (tmp_path / "tensorboard").exists()
