"""segdist.data.location: splits read from http(s), pipe: and fsspec roots, against a real HTTP
server on 127.0.0.1 (tests/shardserver.py), with retries, the sha256 check and the cache."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import time
from collections import Counter

import pytest
import torch

from conftest import assert_same_weights, final_weights, launch, write_exact_recipe
from segdist.data import location
from segdist.data.location import ShardSource, address, root_kind
from segdist.data.manifest import check_reachable, load_manifest
from segdist.data.sample import ShardError, read_shard
from segdist.data.stream import EvalStream
from segdist.errors import UserError
from shardserver import serving


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(location, "BACKOFF_S", 0.05)


def samples(manifest) -> list[dict]:
    """Every raw sample of a split in shard order, without `__url__` (which names where it came from)."""
    return [{k: v for k, v in s.items() if k != "__url__"} for src in manifest.sources() for s in read_shard(src)]


def test_roots_are_told_apart_and_name_their_files():
    assert [root_kind(r) for r in ("data/x", "/abs/x", "file:///abs/x", "http://h/x", "https://h/x",
                                   "pipe:cat /x/{name}", "s3://bucket/x", "memory://x")] == \
        ["local", "local", "local", "http", "http", "pipe", "fsspec", "fsspec"]
    assert address("file:///abs/x", "a.tar") == "/abs/x/a.tar"
    assert address("http://h/x/", "val 1.json") == "http://h/x/val%201.json"
    assert address("pipe:aws s3 cp s3://b/{name} -", "t-000001.tar") == "pipe:aws s3 cp s3://b/t-000001.tar -"
    assert address("s3://bucket/x", "t.tar") == "s3://bucket/x/t.tar"
    with pytest.raises(UserError, match=r"pipe: command without \{name\}"):
        address("pipe:cat /x/shard.tar", "t.tar")


def test_a_split_over_http_is_the_local_split_even_when_the_connection_drops(shapes_root):
    local = load_manifest(shapes_root, "val7")
    with serving(shapes_root) as server:
        remote = load_manifest(server.url, "val7")
        assert remote.classes == local.classes and remote.num_samples == 7
        assert samples(remote) == samples(local)
        size = (shapes_root / "val7-000001.tar").stat().st_size
        server.cut_once("val7-000001.tar", size // 2)
        assert samples(remote) == samples(local)  # the cut shard was fetched again from where it broke off
        assert server.gets["val7-000001.tar"] == 3 and not server.cuts
        # The eval stream over two "ranks": every sample once, as from the folder.
        keys = [k for rank in (0, 1) for k, _, _ in EvalStream.of(remote, rank=rank, world=2, group=2)]
        assert keys == [s["__key__"] for s in samples(local)]


def test_the_cache_keeps_whole_checked_shards_and_nothing_half_read(shapes_root, tmp_path):
    cache = tmp_path / "cache"
    with serving(shapes_root) as server:
        remote = load_manifest(server.url, "val7", cache_dir=str(cache))
        first = remote.sources()[0]
        next(iter(read_shard(first)))  # abandoned after one sample: nothing is kept
        assert not cache.exists() or not any(cache.iterdir())
        before = samples(remote)
        assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s.sha256}.tar" for s in remote.shards)
        gets = sum(server.gets.values())
        assert samples(remote) == before and sum(server.gets.values()) == gets  # read from the cache
        check_reachable(remote)  # cached shards are not asked for either
        assert sum(server.gets.values()) == gets


def test_missing_files_are_one_line_naming_the_url(shapes_root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shapes_root, served)
    (served / "val7-000002.tar").unlink()
    with serving(served) as server:
        remote = load_manifest(server.url, "val7")
        with pytest.raises(UserError, match=rf"^shard {server.url}/val7-000002.tar: HTTP 404 \(not found\)"):
            check_reachable(remote)
        with pytest.raises(UserError, match=r"val7-000002.tar: HTTP 404 \(not found\)"):
            list(read_shard(remote.sources()[2]))
        with pytest.raises(UserError, match=rf"^manifest {server.url}/nope.json: HTTP 404"):
            load_manifest(server.url, "nope")
        assert server.gets["val7-000002.tar"] == 1  # a refusal is not retried


@pytest.mark.slow  # waits out real timeouts and backoff (~30 s)
def test_a_server_that_goes_silent_is_a_broken_read_retried_then_one_line(shapes_root):
    """Headers and 2 KB, then silence with the connection open: without a stall limit the read would
    wait for good. After data.fetch_timeout seconds it is retried like a dropped connection; a server
    that stays silent is one line naming the URL."""
    local = load_manifest(shapes_root, "val7")
    with serving(shapes_root) as server:
        name = "val7-000001.tar"
        source = ShardSource(server.url, name, retries=2, timeout=1)
        server.stall(name, 2048)
        start = time.monotonic()
        strip = lambda shard: [{k: v for k, v in sample.items() if k != "__url__"} for sample in read_shard(shard)]  # noqa: E731
        assert strip(source) == strip(shapes_root / name)
        assert server.gets[name] == 2 and time.monotonic() - start < 30
        server.stall(name, 2048, times=3)
        with pytest.raises(UserError, match=rf"{name}: reading failed 3 times, the last at byte (\d+) "
                                            r"\(no bytes for 1 s, data.fetch_timeout\)") as err:
            list(read_shard(source))
        # the bytes handed on before the silence: some of the 2 KB, as the tar reader's reads fell
        assert int(re.search(r"at byte (\d+)", str(err.value))[1]) <= 2048
    assert local.fetch_timeout == 60.0


def test_a_server_that_is_gone_is_retried_then_one_line(shapes_root):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = ShardSource(f"http://127.0.0.1:{port}", "val7-000000.tar", retries=2)
    with pytest.raises(UserError, match=r"reading failed 3 times, the last at byte 0 \(curl exited with 7\)"):
        list(read_shard(source))
    with pytest.raises(UserError, match="no server answered"):
        location.check_sources([source])


def test_a_shard_that_is_not_the_manifests_is_a_shard_error(shapes_root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shapes_root, served)
    shutil.copy(served / "val7-000000.tar", served / "val7-000001.tar")  # a whole, valid, other shard
    with serving(served) as server:
        remote = load_manifest(server.url, "val7", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ShardError, match="have sha256 .* the manifest says"):
            list(read_shard(remote.sources()[1]))
        assert not any((tmp_path / "cache").iterdir())  # never cached


def test_a_pipe_root_runs_its_command_per_file(shapes_root):
    local = load_manifest(shapes_root, "val7")
    piped = load_manifest(f"pipe:cat {shapes_root}/{{name}}", "val7")
    assert samples(piped) == samples(local)
    with pytest.raises(UserError, match=r"pipe:false x/val7.json: reading failed 2 times, .*exited with 1"):
        load_manifest("pipe:false x/{name}", "val7", retries=1)


@contextlib.contextmanager
def in_memory(shapes_root, folder: str):
    """The val7 split copied into fsspec's memory filesystem at /`folder` (removed after)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in shapes_root.glob("val7*"):
        fs.pipe(f"/{folder}/{path.name}", path.read_bytes())
    try:
        yield fs
    finally:
        fs.rm(f"/{folder}", recursive=True)


def test_an_fsspec_root_is_read_through_fsspec(shapes_root):
    with in_memory(shapes_root, "splits") as fs:
        remote = load_manifest("memory://splits", "val7")
        assert samples(remote) == samples(load_manifest(shapes_root, "val7"))
        fs.rm("/splits/val7-000002.tar")
        with pytest.raises(UserError, match=r"^shard memory://splits/val7-000002.tar: not found"):
            check_reachable(remote)


@pytest.mark.slow
def test_two_processes_train_from_a_url_exactly_as_from_the_folder(shapes_root, tmp_path, reference_weights):
    """The exact-resume recipe (2 processes, a DataLoader worker each, evaluations in between) from
    http://127.0.0.1, with the connection cut once in the middle of a training shard: the final
    weights equal the uninterrupted run's from the folder, bit for bit."""
    recipe = write_exact_recipe(shapes_root, tmp_path)
    with serving(shapes_root) as server:
        server.cut_once("train-000001.tar", (shapes_root / "train-000001.tar").stat().st_size // 2)
        result = launch("train.py", [str(recipe), "--set", f"data.root={server.url}",
                                     "--set", f"data.cache_dir={tmp_path / 'cache'}"], nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not server.cuts and "reading broke off at byte" in result.stderr
    assert_same_weights(final_weights(tmp_path / "run"), reference_weights(2))
    manifest = json.loads((shapes_root / "train.json").read_text())
    assert {p.name for p in (tmp_path / "cache").iterdir()} >= {f"{s['sha256']}.tar" for s in manifest["shards"]}


@pytest.mark.slow
def test_eval_from_a_url_counts_the_same_confusion_matrix(trained_run, shapes_root, tmp_path):
    recipe, run = trained_run
    local = tmp_path / "local.json"
    assert launch("eval.py", [str(recipe), "--checkpoint", str(run), "--out", str(local)]).returncode == 0
    with serving(shapes_root) as server:
        result = launch("eval.py", [str(recipe), "--checkpoint", str(run), "--out", str(tmp_path / "url.json"),
                                    "--set", f"data.root={server.url}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads((tmp_path / "url.json").read_text())
    assert remote["confusion_matrix"] == json.loads(local.read_text())["confusion_matrix"]
    assert torch.tensor(remote["confusion_matrix"]).sum() > 0


def test_training_from_a_url_with_a_missing_shard_stops_before_writing(tiny_recipe, shapes_root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shapes_root, served)
    (served / "train-000003.tar").unlink()
    with serving(served) as server:
        result = launch("train.py", [str(tiny_recipe), "--set", f"data.root={server.url}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"shard {server.url}/train-000003.tar: HTTP 404 (not found); check data.root and the credentials")
    assert not (tmp_path / "run").exists()


# -- reading one sample by position ----------------------------------------------------------------
def by_position(manifest, order=None) -> list[dict]:
    """Every sample of a split read by position (read_sample), without `__url__`; in `order`
    (indices into shard order) when given."""
    from segdist.data.sample import read_sample

    where = [(src, key, members) for info, src in zip(manifest.shards, manifest.sources()) for key, members in info.members]
    if order is not None:
        where = [where[i] for i in order]
    return [{k: v for k, v in read_sample(*w).items() if k != "__url__"} for w in where]


ORDER = [5, 0, 6, 2, 1, 4, 3]
"""A shuffled order of val7's 7 samples."""


def test_samples_read_by_position_over_http_are_range_requests_one_per_sample(shapes_root):
    local = samples(load_manifest(shapes_root, "val7"))
    with serving(shapes_root) as server:
        remote = load_manifest(server.url, "val7")
        assert by_position(remote, ORDER) == [local[i] for i in ORDER]
        shard_gets = {name: n for name, n in server.gets.items() if name.endswith(".tar")}
        assert shard_gets == {s.file: s.samples for s in remote.shards} and server.ranges == server.gets - Counter(["val7.json"])
        # a connection cut in the middle of a range resumes at the byte where it broke off
        name = remote.shards[1].file
        server.cut_once(name, 100)
        assert by_position(remote) == local
        assert server.gets[name] == 2 * remote.shards[1].samples + 1 and not server.cuts


def test_a_server_that_ignores_ranges_or_a_short_shard_is_one_line(shapes_root, tmp_path):
    from segdist.data.sample import CorruptSample, read_sample

    served = tmp_path / "served"
    shutil.copytree(shapes_root, served)
    with serving(served) as server:
        remote = load_manifest(server.url, "val7")
        info, source = remote.shards[0], remote.sources()[0]
        server.honour_ranges = False
        key, members = info.members[1]
        with pytest.raises(UserError, match=rf"^shard {server.url}/{info.file}: the server sent more than the \d+ bytes "
                                            rf"asked for from byte {members[0][1] - 512}: it ignores HTTP range requests; "
                                            "set data.cache_dir"):
            read_sample(source, key, members)
        server.honour_ranges = True
        path = served / info.file
        path.write_bytes(path.read_bytes()[:members[-1][1]])  # cut inside sample 1: sample 2 lies past the end
        for key, members in info.members[1:]:  # a 206 with fewer bytes, then a 416
            with pytest.raises(CorruptSample, match=rf"^sample {key} in {server.url}/{info.file} is cut short"):
                read_sample(source, key, members)
        assert read_sample(source, *info.members[0])["__key__"] == info.members[0][0]


@pytest.mark.slow  # waits out real timeouts (~20 s)
def test_a_server_that_goes_silent_mid_range_is_retried_then_one_line(shapes_root):
    from segdist.data.sample import read_sample

    local = samples(load_manifest(shapes_root, "val7"))
    with serving(shapes_root) as server:
        remote = load_manifest(server.url, "val7", retries=1, timeout=1)
        info, source = remote.shards[2], remote.sources()[2]
        key, members = info.members[0]
        server.stall(info.file, 100)
        start = time.monotonic()
        got = read_sample(source, key, members)
        assert {k: v for k, v in got.items() if k != "__url__"} == local[6] and time.monotonic() - start < 30
        assert server.ranges[info.file] == 2
        server.stall(info.file, 100, times=2)
        with pytest.raises(UserError, match=rf"^shard {server.url}/{info.file}: reading failed 2 times, the last at byte "
                                            r"(\d+) \(no bytes for 1 s, data.fetch_timeout\)") as err:
            read_sample(source, key, members)
        # within the range (it starts at the first member's 512-byte tar header): each try sent 100 bytes
        # of what was left of it, handed on or not as the silence fell between curl's reads
        first = members[0][1] - 512
        assert first <= int(re.search(r"at byte (\d+)", str(err.value))[1]) <= first + 200


def test_with_a_cache_each_shard_is_fetched_whole_once_then_read_locally(shapes_root, tmp_path):
    local = samples(load_manifest(shapes_root, "val7"))
    cache = tmp_path / "cache"
    with serving(shapes_root) as server:
        remote = load_manifest(server.url, "val7", cache_dir=str(cache))
        assert by_position(remote, ORDER) == [local[i] for i in ORDER]
        assert {n: c for n, c in server.gets.items() if n.endswith(".tar")} == {s.file: 1 for s in remote.shards}
        assert not server.ranges
        assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s.sha256}.tar" for s in remote.shards)
        gets = sum(server.gets.values())
        assert by_position(remote) == local and sum(server.gets.values()) == gets


def test_by_position_a_shard_that_is_not_the_manifests_is_a_shard_error_and_never_cached(shapes_root, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shapes_root, served)
    shutil.copy(served / "val7-000000.tar", served / "val7-000001.tar")
    with serving(served) as server:
        remote = load_manifest(server.url, "val7", cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ShardError, match=rf"^shard {server.url}/val7-000001.tar is truncated or corrupt \(its \d+ "
                                             r"bytes have sha256 .* the manifest says"):
            by_position(remote)
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{remote.shards[0].sha256}.tar"]  # the good one


def test_a_pipe_root_reads_by_position_through_its_cache_only(shapes_root, tmp_path):
    local = samples(load_manifest(shapes_root, "val7"))
    with pytest.raises(UserError, match=r"is a pipe: command, which cannot read one sample of a shard: set data.cache_dir"):
        by_position(load_manifest(f"pipe:cat {shapes_root}/{{name}}", "val7"))
    piped = load_manifest(f"pipe:cat {shapes_root}/{{name}}", "val7", cache_dir=str(tmp_path / "cache"))
    assert by_position(piped, ORDER) == [local[i] for i in ORDER]
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_an_fsspec_root_reads_by_position_with_a_seek(shapes_root):
    with in_memory(shapes_root, "byposition"):
        remote = load_manifest("memory://byposition", "val7")
        assert by_position(remote, ORDER) == [[*samples(load_manifest(shapes_root, "val7"))][i] for i in ORDER]
