"""Optimizers and LR schedules: closed-form values at chosen steps, agreement with torch's own
schedulers, an exact mid-run save/load (weights_only), parameter groups and errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, PolynomialLR, SequentialLR

from segdist.errors import UserError
from segdist.optim import OPTIMIZERS, build_optimizer, build_scheduler
from segdist.recipe import OptimConfig, ScheduleConfig

LR, T, W = 0.1, 50, 5


def optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return build_optimizer(torch.nn.Linear(3, 2), OptimConfig(name="sgd", lr=lr, weight_decay=0.0))


def lrs(scheduler, steps: int) -> list[float]:
    """The LR each of `steps` optimizer steps uses (as the trainer steps it: once per step)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


# Closed forms written out by hand at chosen steps: (name, power, min_lr, {step: lr}).
CHOSEN = [
    ("constant", 0.9, 0.0, {0: LR / W, 2: 3 * LR / W, 4: LR, 5: LR, 49: LR}),
    # decay progress s = (t - 5) / 45: step 14 → 0.2, step 32 → 0.6, step 49 → 44/45
    ("poly", 0.9, 0.0, {0: LR / W, 4: LR, 5: LR, 14: LR * 0.8**0.9, 49: LR * (1 / 45) ** 0.9}),
    ("poly", 2.0, 0.01, {5: LR, 14: 0.01 + 0.09 * 0.64, 32: 0.01 + 0.09 * 0.16, 49: 0.01 + 0.09 / 45**2}),
    ("cosine", 0.9, 0.0, {3: 4 * LR / W, 5: LR, 14: LR * (1 + math.cos(0.2 * math.pi)) / 2,
                          49: LR * (1 + math.cos(math.pi * 44 / 45)) / 2}),
    ("cosine", 0.9, 0.02, {5: LR, 32: 0.02 + 0.08 * (1 + math.cos(0.6 * math.pi)) / 2, 50: 0.02, 60: 0.02}),
    ("onecycle", 0.9, 0.004, {0: LR / 25, 2: LR / 25 + (LR - LR / 25) / 2, 4: LR, 27: LR + (0.004 - LR) * 23 / 45,
                              49: 0.004, 55: 0.004}),
]


@pytest.mark.parametrize("name, power, min_lr, expected", CHOSEN, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CHOSEN])
def test_schedule_values_equal_the_closed_form(name, power, min_lr, expected):
    cfg = ScheduleConfig(name=name, warmup_steps=W, power=power, min_lr=min_lr)
    values = lrs(build_scheduler(optimizer(), cfg, T), max(expected) + 1)
    for step, lr in expected.items():
        assert values[step] == pytest.approx(lr, rel=1e-9, abs=1e-12), f"step {step}"


def torch_reference(name: str, opt, min_lr: float):
    """The same curves from torch's own schedulers (min_lr > 0 only where torch has a floor)."""
    warm = LinearLR(opt, start_factor=1 / W, end_factor=1.0, total_iters=W - 1)
    if name == "poly":
        return SequentialLR(opt, [warm, PolynomialLR(opt, total_iters=T - W, power=0.9)], milestones=[W])
    if name == "cosine":
        return SequentialLR(opt, [warm, CosineAnnealingLR(opt, T_max=T - W, eta_min=min_lr)], milestones=[W])
    if name == "onecycle":
        return OneCycleLR(opt, max_lr=LR, total_steps=T, pct_start=W / T, anneal_strategy="linear",
                          cycle_momentum=False, div_factor=25.0, final_div_factor=(LR / 25) / min_lr)
    raise ValueError(name)


@pytest.mark.parametrize("name, min_lr", [("poly", 0.0), ("cosine", 0.003), ("onecycle", 0.002)])
def test_schedules_match_torch_schedulers(name, min_lr):
    ours = lrs(build_scheduler(optimizer(), ScheduleConfig(name=name, warmup_steps=W, min_lr=min_lr), T), T)
    theirs = lrs(torch_reference(name, optimizer(), min_lr), T)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["poly", "cosine", "onecycle", "constant"])
def test_state_dict_round_trip_mid_run_continues_identically(name):
    cfg = ScheduleConfig(name=name, warmup_steps=W, min_lr=0.001)
    straight = lrs(build_scheduler(optimizer(), cfg, T), T)
    first = build_scheduler(optimizer(), cfg, T)
    head = lrs(first, 17)
    buf = io.BytesIO()
    torch.save({"optimizer": first.optimizer.state_dict(), "scheduler": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what checkpoint.load_checkpoint does
    resumed = build_scheduler(optimizer(), cfg, T)
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert head + lrs(resumed, T - 17) == straight


def test_resume_with_more_steps_follows_the_new_curve():
    """The recipe, not the saved state, defines the curve: extending train.steps re-targets the decay
    (torch's CosineAnnealingLR restored from a state_dict would keep the old T_max and climb back)."""
    cfg = ScheduleConfig(name="cosine", warmup_steps=W)
    first = build_scheduler(optimizer(), cfg, T)
    lrs(first, 20)
    longer = build_scheduler(optimizer(), cfg, 2 * T)
    longer.optimizer.load_state_dict(first.optimizer.state_dict())  # holds the old curve's LR
    longer.load_state_dict(first.state_dict())
    assert longer.last_epoch == 20
    new_curve = [LR * (1 + math.cos(math.pi * s / (2 * T - W))) / 2 for s in (15, 16)]
    assert lrs(longer, 2) == pytest.approx(new_curve, rel=1e-12)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(LR * (1 + math.cos(math.pi * 17 / 95)) / 2)


def test_encoder_lr_multiplier_and_no_decay_groups():
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=3, decoder_channels=(16, 8, 8, 8, 8))
    opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.05, encoder_lr_mult=0.1))
    encoder = {id(p) for p in model.encoder.parameters()}
    seen = set()
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        seen |= ids
        in_encoder = ids <= encoder
        assert in_encoder or not ids & encoder, "a group mixes encoder and decoder parameters"
        assert group["lr"] == pytest.approx(0.01 * (0.1 if in_encoder else 1.0))
        one_d = all(p.ndim <= 1 for p in group["params"])
        assert group["weight_decay"] == (0.0 if one_d else 0.05)
    assert len(opt.param_groups) == 4 and seen == {id(p) for p in model.parameters()}
    # the schedule scales every group by the same factor, and the floor with it
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.001), 10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [0.0001, 0.001]


def test_optimizers_are_built_as_named():
    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adam = build_optimizer(model, OptimConfig(name="adam", betas=[0.8, 0.9]))
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.8, 0.9)
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW


@pytest.mark.parametrize("make, needle", [
    (lambda: build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="lion")), "valid names: adamw, adam, sgd"),
    (lambda: build_scheduler(optimizer(), ScheduleConfig(name="step"), T), "valid names: constant, poly, cosine, onecycle"),
    (lambda: build_scheduler(optimizer(), ScheduleConfig(name="onecycle", warmup_steps=1), T), "2 <= warmup_steps"),
    (lambda: build_scheduler(optimizer(), ScheduleConfig(min_lr=1.0), T), "exceeds optim.lr"),
    (lambda: build_optimizer(torch.nn.Linear(2, 2), OptimConfig(encoder_lr_mult=0.1)), "no `encoder` submodule"),
    (lambda: OptimConfig(name="adamw", nesterov=True), "optim.nesterov"),
    (lambda: OptimConfig(betas=[0.9]), "optim.betas"),
    (lambda: OptimConfig(implementation="fast"), "optim.implementation: unknown 'fast'; valid: fused, foreach, for-loop"),
])
def test_errors_name_the_key(make, needle):
    with pytest.raises(UserError) as err:
        make()
    assert needle in str(err.value)


def _steps(name: str, implementation: str, steps: int = 5) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """`steps` updates of a small conv net (decayed weights, undecayed norms and biases) from the
    same gradients, under one optim.implementation."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.01, weight_decay=0.05, nesterov=name == "sgd",
                                             implementation=implementation))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_implementation_takes_the_same_update(name):
    flags = {"fused": (True, None), "foreach": (None, True), "for-loop": (None, False)}
    weights = {}
    for implementation, (fused, foreach) in flags.items():
        opt, weights[implementation] = _steps(name, implementation)
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
    # foreach computes the for-loop's arithmetic, element by element; fused rounds its own way.
    assert all(torch.equal(a, b) for a, b in zip(weights["foreach"], weights["for-loop"]))
    for a, b in zip(weights["fused"], weights["for-loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert weights["fused"][0].ne(_steps(name, "fused", steps=0)[1][0]).all()  # and it did update



def test_a_state_saved_by_another_implementation_loads_and_steps():
    # a checkpoint written before fused became the default resumes under it (and back)
    for saved_by, loaded_by in (("for-loop", "fused"), ("fused", "for-loop")):
        opt, _ = _steps("adamw", saved_by, steps=2)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
        again = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.05, implementation=loaded_by))
        again.load_state_dict(opt.state_dict())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        again.step()
        assert all(s["step"].item() == 3 for s in again.state.values()) and len(again.state) == 6
