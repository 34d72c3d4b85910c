"""Losses: term weights combine as stated, ce/bce mean semantics, ignore honoured by every term,
class weights, errors — and the exact normalisation over accumulation and ranks, shown with two
real gloo processes running the trainer's own train_step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port, leave_worker
from segdist.errors import UserError
from segdist.losses import TERMS, build_loss, derive_class_weights
from segdist.recipe import LossConfig

IGNORE = 255


def batch(n=2, classes=4, h=12, w=10, ignore_frac=0.2, seed=0, binary=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1 if binary else classes, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, 2 if binary else classes, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


def test_term_weights_combine_as_stated():
    import segmentation_models_pytorch.losses as L

    logits, target = batch()
    cfg = LossConfig(terms=[{"name": "ce", "weight": 0.7}, {"name": "dice", "weight": 0.3, "smooth": 1e-5}])
    ours = build_loss(cfg, 4, IGNORE)(logits, target)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    dice = L.DiceLoss("multiclass", ignore_index=IGNORE, smooth=1e-5)(logits, target)
    torch.testing.assert_close(ours, 0.7 * ce + 0.3 * dice, rtol=1e-6, atol=1e-7)
    # a term's weight scales exactly that term
    doubled = build_loss(LossConfig(terms=[{"name": "ce", "weight": 1.4}, {"name": "dice", "weight": 0.3, "smooth": 1e-5}]),
                         4, IGNORE)(logits, target)
    torch.testing.assert_close(doubled - ours, 0.7 * ce, rtol=1e-5, atol=1e-6)


def test_weighted_ce_with_smoothing_equals_pytorch_mean():
    logits, target = batch(ignore_frac=0.3)
    weights = [0.5, 2.0, 1.0, 3.0]
    cfg = LossConfig(label_smoothing=0.1, class_weights=weights)
    ours = build_loss(cfg, 4, IGNORE)(logits, target)
    ref = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_bce_ignores_and_weights_pixels():
    logits, target = batch(binary=True, ignore_frac=0.3)
    loss = build_loss(LossConfig(terms=[{"name": "bce", "weight": 1.0}], class_weights=[1.0, 4.0],
                                 label_smoothing=0.2), 1, IGNORE)
    value = loss(logits, target)
    valid = target != IGNORE
    y = target.clamp(max=1).float() * 0.8 + 0.1
    w = torch.where(target == 1, 4.0, 1.0) * valid
    ref = (F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none") * w).sum() / w.sum()
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7)
    value.backward()
    assert (logits.grad[:, 0][~valid] == 0).all() and (logits.grad[:, 0][valid] != 0).all()


CASES = [(name, binary) for name, (_, for_binary, for_multi) in TERMS.items()
         for binary in (True, False) if (for_binary if binary else for_multi)]


@pytest.mark.parametrize("name, binary", CASES, ids=[f"{n}-{'binary' if b else 'multiclass'}" for n, b in CASES])
def test_every_term_trains_and_ignores_ignored_pixels(name, binary):
    logits, target = batch(binary=binary, ignore_frac=0.3, seed=1)
    loss = build_loss(LossConfig(terms=[{"name": name, "weight": 1.0}]), 1 if binary else 4, IGNORE)(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    ignored = (target == IGNORE)[:, None].expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0, "an ignored pixel moved the loss"
    assert logits.grad[~ignored].abs().max() > 0


def test_structural_loss_prefers_the_right_answer():
    _, target = batch(binary=True, ignore_frac=0.1, seed=2)
    loss = build_loss(LossConfig(terms=[{"name": "structural", "weight": 1.0, "beta": 0.1}]), 1, IGNORE)
    right = (target.clamp(max=1).float() * 8 - 4)[:, None]  # confident and correct
    wrong = -right
    assert loss(right, target) < 0.1 * loss(wrong, target)


def test_class_weighting_from_pixel_counts():
    counts = [600, 300, 100, 0]
    inv = derive_class_weights("inverse", counts)
    assert inv == pytest.approx([1000 / (4 * 600), 1000 / (4 * 300), 1000 / (4 * 100), 0.0])
    assert derive_class_weights("sqrt_inverse", counts) == pytest.approx([v**0.5 for v in inv])
    assert derive_class_weights("median_frequency", counts) == pytest.approx([0.3 / 0.6, 1.0, 0.3 / 0.1, 0.0])
    loss = build_loss(LossConfig(class_weighting="inverse"), 4, IGNORE, class_pixels=counts)
    _, target = batch()
    expected = sum(inv[c] * int((target == c).sum()) for c in range(4))
    assert float(loss.count(target)[0]) == pytest.approx(expected)


@pytest.mark.parametrize("terms, classes, needle", [
    ([{"name": "cee"}], 4, "valid names: ce, bce"),
    ([{"name": "ce"}], 1, 'use "bce"'),
    ([{"name": "bce"}], 4, 'use "ce"'),
    ([{"name": "dice", "smoth": 1.0}], 4, "has no option 'smoth'; its options: classes, log_loss"),
    ([{"name": "ce", "smooth": 1.0}], 4, "loss.label_smoothing"),
    ([{"name": "focal", "weight": "x"}], 4, "weight must be a number"),
])
def test_bad_terms_name_the_problem(terms, classes, needle):
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(terms=terms), classes, IGNORE)
    assert needle in str(err.value) and "loss.terms[0]" in str(err.value)


def test_class_weights_must_match_the_classes():
    with pytest.raises(UserError, match="has 3 entries, the dataset has 4"):
        build_loss(LossConfig(class_weights=[1.0, 1.0, 1.0]), 4, IGNORE)
    with pytest.raises(UserError, match="both set"):
        LossConfig(class_weights=[1.0, 1.0], class_weighting="inverse")


# ---------------------------------------------------------------------------------------------
# Exact normalisation: 2 ranks x 2 accumulation micro-batches == one batch of all 8 samples.

WORLD, ACCUM, PER = 2, 2, 2
# Valid-pixel fraction of each (rank, micro-batch): deliberately very different.
KEEP = [[1.0, 0.6], [0.25, 0.05]]


def grad_data(binary: bool):
    """Images (uint8 NHWC, as the loader gives them) and masks of the whole effective batch, split
    into [rank][micro-batch] windows."""
    g = torch.Generator().manual_seed(11 + binary)
    images = torch.randint(0, 256, (WORLD, ACCUM, PER, 16, 16, 3), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 2 if binary else 3, (WORLD, ACCUM, PER, 16, 16), generator=g)
    for r in range(WORLD):
        for a in range(ACCUM):
            drop = torch.rand(PER, 16, 16, generator=g) >= KEEP[r][a]
            masks[r, a][drop] = IGNORE
    return images, masks


def small_model(classes: int) -> torch.nn.Module:
    torch.manual_seed(5)  # no BatchNorm: a batch's statistics would differ from a micro-batch's
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, classes, 1))


CONFIGS = {
    "multiclass": (3, LossConfig(label_smoothing=0.1, class_weights=[0.2, 1.0, 5.0])),
    "binary": (1, LossConfig(terms=[{"name": "bce", "weight": 1.0}], class_weights=[1.0, 3.0])),
}


def _grad_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from segdist.distributed import make_accelerator
    from segdist.train.step import train_step
    from segdist.precision import Precision

    accelerator = make_accelerator(Precision("fp32", "fp32", "test"), ACCUM)
    assert accelerator.num_processes == WORLD  # a real 2-rank group, not two single runs
    result = {}
    for name, (classes, cfg) in CONFIGS.items():
        model = small_model(classes)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is exactly -gradient
        model, optimizer = accelerator.prepare(model, optimizer)
        images, masks = grad_data(classes == 1)
        window = [(images[rank, a], masks[rank, a]) for a in range(ACCUM)]
        outcome = train_step(model, optimizer, build_loss(cfg, classes, IGNORE), window, accelerator, 0.0)
        assert outcome.applied
        after = accelerator.unwrap_model(model).parameters()
        result[name] = [b - a.detach() for b, a in zip(before, after)]
    torch.save(result, os.path.join(out_dir, f"grad-{rank}.pt"))
    leave_worker(accelerator)


def reference_gradient(name: str, per_micro_batch_mean: bool = False) -> list[torch.Tensor]:
    from segdist.preprocess import to_input

    classes, cfg = CONFIGS[name]
    model = small_model(classes)
    images, masks = grad_data(classes == 1)
    loss_fn = build_loss(cfg, classes, IGNORE)
    if per_micro_batch_mean:  # what averaging each micro-batch's own mean would give
        loss = sum(loss_fn(model(to_input(images[r, a], "cpu")), masks[r, a])
                   for r in range(WORLD) for a in range(ACCUM)) / (WORLD * ACCUM)
    else:  # one batch of all samples: the mean over all its valid pixels (PyTorch's own mean)
        x, y = images.reshape(-1, 16, 16, 3), masks.reshape(-1, 16, 16)
        logits = model(to_input(x, "cpu"))
        w = torch.tensor(cfg.class_weights)
        if classes == 1:
            valid = y != IGNORE
            pw = torch.where(valid, w[y.clamp(max=1)], 0.0)
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], y.clamp(max=1).float(), weight=pw,
                                                       reduction="sum") / pw.sum())
        else:
            loss = F.cross_entropy(logits, y, weight=w, ignore_index=IGNORE, label_smoothing=cfg.label_smoothing)
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.slow
def test_accumulated_two_rank_gradient_equals_single_batch_gradient(tmp_path):
    mp.start_processes(_grad_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"grad-{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in CONFIGS:
        exact = reference_gradient(name)
        naive = reference_gradient(name, per_micro_batch_mean=True)
        for r in range(WORLD):
            for got, want in zip(ranks[r][name], exact):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # the data is uneven enough that a mean of micro-batch means would be clearly wrong
        assert max(float((n - e).abs().max() / e.abs().max()) for n, e in zip(naive, exact)) > 0.05
