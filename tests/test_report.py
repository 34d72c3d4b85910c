"""Evaluation reports: the per-class table, the figures and the image strips, from a confusion
matrix whose every number is known."""

import csv
import io
import json

import numpy as np
import torch
from PIL import Image

from segdist.metrics import metrics_from_confusion
from segdist.report import (colorize, confusion_figure, error_map, image_iou, iou_bar_chart, per_class_csv,
                            per_class_markdown, row_normalised, strip, upscale, write_report)

CLASSES = ["road", "car", "sky"]
# rows = truth: road 10 pixels (8 right, 2 as car), car 5 (all right), sky none, 1 road predicted as sky
MATRIX = torch.tensor([[8, 2, 1], [0, 5, 0], [0, 0, 0]], dtype=torch.int64)


def metrics():
    m = metrics_from_confusion(MATRIX)
    m["num_samples"] = 2
    return m


def test_per_class_csv_holds_every_number():
    rows = list(csv.DictReader(io.StringIO(per_class_csv(metrics(), CLASSES))))
    assert [r["class"] for r in rows] == CLASSES
    road, car, sky = rows
    assert float(road["iou"]) == 8 / 11 and float(road["recall"]) == 8 / 11 and float(road["precision"]) == 1.0
    assert float(car["iou"]) == 5 / 7 and float(car["precision"]) == 5 / 7
    assert (road["truth_pixels"], road["predicted_pixels"]) == ("11", "8")
    assert (car["truth_pixels"], car["predicted_pixels"]) == ("5", "7")
    assert sky["iou"] == "0.0" and sky["recall"] == "" and (sky["truth_pixels"], sky["predicted_pixels"]) == ("0", "1")


def test_per_class_markdown_is_a_table_with_the_miou():
    text = per_class_markdown(metrics(), CLASSES)
    lines = text.splitlines()
    assert lines[0].startswith("| class | IoU % |") and lines[1].startswith("|---|")
    assert lines[2] == "| road | 72.73 | 100.00 | 72.73 | 84.21 | 11 | 8 |"
    assert lines[4] == "| sky | 0.00 | 0.00 | n/a | 0.00 | 0 | 1 |"
    assert f"mIoU **{100 * (8 / 11 + 5 / 7 + 0) / 3:.2f} %**" in text and "of 2 samples" in text


def test_row_normalised_rows_sum_to_one_and_absent_rows_are_zero():
    shares = row_normalised(MATRIX.numpy())
    np.testing.assert_allclose(shares.sum(1), [1, 1, 0])
    assert shares[0, 1] == 2 / 11


def test_figures_are_images_with_room_for_the_names():
    figure = confusion_figure(MATRIX.tolist(), CLASSES)
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[2] == 3 and min(figure.shape[:2]) > 200
    assert len(np.unique(figure.reshape(-1, 3), axis=0)) > 10  # drawn, not blank
    many = confusion_figure(np.eye(150, dtype=np.int64).tolist(), [f"c{i}" for i in range(150)])  # ADE20K's size
    assert many.shape[0] > figure.shape[0]
    bars = iou_bar_chart(metrics(), CLASSES)
    assert bars.dtype == np.uint8 and bars.shape[2] == 3


def test_write_report_writes_four_files(tmp_path):
    folder = write_report(tmp_path / "step-4", metrics(), CLASSES)
    assert sorted(p.name for p in folder.iterdir()) == ["confusion.png", "metrics.json", "per_class.csv", "per_class.md"]
    assert json.loads((folder / "metrics.json").read_text())["confusion_matrix"] == MATRIX.tolist()
    assert np.asarray(Image.open(folder / "confusion.png")).shape[2] == 3


def test_strips_are_readable_and_keep_label_colours():
    palette = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]
    image = np.full((32, 40, 3), 7, dtype=np.uint8)
    truth = np.zeros((32, 40), dtype=np.uint8)
    truth[:, 20:] = 1
    truth[0, 0] = 255
    pred = truth.copy()
    pred[:16, 20:] = 2
    pred[0, 0] = 0
    out = strip(image, truth, pred, palette, 255, errors=True)
    assert out.shape == (256, 4 * 320 + 3 * 4, 3)  # 8x nearest upscaling, 4 px gaps
    up = upscale(colorize(pred, palette, 255))
    np.testing.assert_array_equal(out[:, 2 * 324: 2 * 324 + 320], up)
    assert set(map(tuple, np.unique(up.reshape(-1, 3), axis=0))) == {(0, 0, 0), (200, 0, 0), (0, 200, 0)}
    errors = error_map(truth, pred, 255)
    assert tuple(errors[0, 0]) == (255, 255, 255) and tuple(errors[0, 30]) == (230, 40, 40)
    assert tuple(errors[20, 30]) == (40, 40, 40)
    assert upscale(np.zeros((300, 10, 3), np.uint8)).shape == (300, 10, 3)  # large enough already


def test_image_iou_ranks_images():
    truth = np.array([[0, 0], [1, 255]])
    assert image_iou(truth, np.array([[0, 0], [1, 1]]), 3, 255) == 1.0
    assert image_iou(truth, np.array([[0, 1], [1, 0]]), 3, 255) == (1 / 2 + 1 / 2) / 2
    assert image_iou(np.full((2, 2), 255), np.zeros((2, 2)), 3, 255) == 1.0
