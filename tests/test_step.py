import pytest
import torch

from segdist.distributed import make_accelerator
from segdist.losses import build_loss
from segdist.precision import Precision
from segdist.recipe import LossConfig
from segdist.step import train_step


def test_a_window_that_does_not_end_an_accumulation_is_refused_before_the_optimizer_steps():
    # train_step steps the optimizer itself, past Accelerate's sync check: a window shorter than
    # grad_accum would update on gradients that were never all-reduced.
    accelerator = make_accelerator(Precision("fp32", "fp32", "test"), 2)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    masks = torch.randint(0, 3, (2, 8, 8))
    with pytest.raises(RuntimeError, match="a window of 1 micro-batches did not end an accumulation of 2"):
        train_step(model, optimizer, build_loss(LossConfig(), 3, 255), [(images, masks)], accelerator, 0.0)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no update
    accelerator.end_training()
