import pytest
import torch

from conftest import leave_worker
from segdist.distributed import make_accelerator
from segdist.losses import build_loss
from segdist.precision import Precision
from segdist.recipe import LossConfig
from segdist.train.step import train_step


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


def test_the_next_windows_labels_are_cast_once_and_train_the_next_step_as_they_are():
    from segdist.train.step import on_device

    accelerator = make_accelerator(Precision("fp32", "fp32", "test"), 1)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(0)

    def draw():  # as the loader gives them: uint8 images and labels
        return [(torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g),
                 torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8, generator=g))]

    loss_fn = build_loss(LossConfig(), 3, 255)
    drawn = draw()
    out = train_step(model, optimizer, loss_fn, draw(), accelerator, 0.0, fetch_next=lambda: drawn)
    (images, labels), = out.next_window
    assert images is drawn[0][0] and labels.dtype == torch.int64 and labels.device == accelerator.device
    assert torch.equal(labels, drawn[0][1].long())
    assert on_device(out.next_window, accelerator.device)[0][1] is labels  # the next step casts nothing
    assert out.next_counts == [2 * 64.0]
    before = model.weight.detach().clone()
    out = train_step(model, optimizer, loss_fn, out.next_window, accelerator, 0.0, counts=out.next_counts)
    assert out.applied and out.next_window is None and not torch.equal(before, model.weight)
    accelerator.end_training()


def test_the_buffer_snapshot_puts_back_the_running_statistics_even_after_the_buffers_were_replaced():
    from segdist.train.step import BufferSnapshot

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    snapshot = BufferSnapshot.of(model)
    assert BufferSnapshot.of(model) is snapshot  # one per model, reused every step
    for _ in range(2):  # the second time it reuses its storage
        snapshot.keep()
        before = [b.clone() for b in model.buffers()]
        model(torch.randn(2, 3, 5, 5))  # a training forward moves every running statistic
        assert not all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
        snapshot.restore()
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    model.to(torch.float64)  # new buffer tensors: the snapshot must follow them, not the old ones
    snapshot.keep()
    before = [b.clone() for b in model.buffers()]
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    snapshot.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert [s.dtype for s in snapshot.saved] == [b.dtype for b in model.buffers()]


WORLD, ACCUM = 2, 2


def _order_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank `rank` of a real 2-rank gloo group: one train_step of 2 micro-batches, with every
    Python-level collective and every backward recorded in the order they happen."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    accelerator = make_accelerator(Precision("fp32", "fp32", "test"), ACCUM)
    assert accelerator.num_processes == WORLD  # a real 2-rank group, not two single runs
    events = []
    all_reduce = dist.all_reduce

    def recorded_all_reduce(tensor, *args, **kwargs):
        events.append(("all_reduce", bool(kwargs.get("async_op", False))))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recorded_all_reduce  # DDP's gradient buckets go through C++, not this
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    model.weight.register_hook(lambda grad: events.append(("backward",)))
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    g = torch.Generator().manual_seed(rank)

    def batch(ignored: int):
        masks = torch.randint(0, 3, (2, 8, 8), generator=g)
        masks.view(-1)[:ignored] = 255
        return torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g), masks

    window, next_window = [batch(0), batch(0)], [batch(10 + rank), batch(3)]
    loss_fn = build_loss(LossConfig(), 3, 255)
    out = train_step(model, optimizer, loss_fn, window, accelerator, 0.0, counts=[2 * 2 * 2 * 64.0],
                     stop_requested=rank == 1, fetch_next=lambda: next_window)
    torch.save({"events": events, "applied": out.applied, "stopping": out.stopping,
                "next_counts": out.next_counts}, os.path.join(out_dir, f"order-{rank}.pt"))
    leave_worker(accelerator)


@pytest.mark.slow
def test_the_steps_one_collective_runs_during_the_last_backward_and_sums_every_ranks_flags(tmp_path):
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.start_processes(_order_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"order-{rank}.pt", weights_only=True)
        # One collective of segdist's own, started (not waited for) between the two micro-batches'
        # backwards: the ranks meet once, in DDP's gradient all-reduce, not again after it.
        assert got["events"] == [("backward",), ("all_reduce", True), ("backward",)]
        assert got["applied"]
        assert got["stopping"]  # rank 1 alone was asked to stop: both stop after this step
        # the next window's valid pixels over both ranks: 4 masks of 2x8x8 each rank, less the ignored
        assert got["next_counts"] == [4 * 128 - (10 + 0) - (10 + 1) - 2 * 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only between a host and a GPU")
def test_a_pinned_batch_reaches_the_gpu_without_a_host_sync():
    """The loader pins batches on CUDA; their copies (images through to_input, labels through
    on_device) and the normalisation constants must not make the host wait for the GPU."""
    from segdist.preprocess import to_input
    from segdist.train.step import on_device

    device = torch.device("cuda", torch.cuda.current_device())
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8).pin_memory()
    masks = torch.randint(0, 5, (2, 16, 16), dtype=torch.uint8).pin_memory()
    to_input(images[:1], device)  # the first call may copy the constants once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = to_input(images, device)
        (_, labels), = on_device([(images, masks)], device)
        flag = torch.full((), True, device=device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.device == labels.device == device and labels.dtype == torch.int64 and flag.dtype == torch.bool
    assert torch.equal(labels.cpu(), masks.long())
