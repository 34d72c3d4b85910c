"""segdist.data.sample: member names, the tar reader, the label check, padding and bit depth."""

import io
import tarfile

import numpy as np
import pytest

from segdist.data.sample import (ShardError, label_counts, make_sample, member_name, pad_image, padded_size,
                                 read_members, read_shard, split_member, to_uint8)
from segdist.errors import UserError


def test_member_names_follow_webdatasets_rule():
    assert member_name("frame_001", "image.png") == "frame_001.image.png"
    assert split_member("frame_001.image.png") == ("frame_001", "image.png")
    assert split_member("city/a_b.MASK.PNG") == ("city/a_b", "mask.png")  # folder kept, kind lower-cased
    assert split_member("README") is None and split_member(".hidden") is None


def test_label_counts_finds_the_smallest_stray_label():
    mask = np.array([[0, 1, 255], [3, 7, 1]], dtype=np.uint8)
    counts, bad = label_counts(mask, 4, 255)
    assert counts.tolist() == [1, 2, 0, 1] and bad == 7
    counts, bad = label_counts(np.array([[0, 255]], dtype=np.uint16), 2, 255)
    assert counts.tolist() == [1, 0] and bad is None


def test_padding_and_bit_depth():
    assert padded_size(33, 64) == (64, 64) and padded_size(1, 1, 8) == (8, 8)
    image = np.full((5, 40, 3), 9, dtype=np.uint8)
    out = pad_image(image)
    assert out.shape == (32, 64, 3) and (out[:5, :40] == 9).all() and out[5:].sum() == 0 and out[:, 40:].sum() == 0
    assert to_uint8(np.array([0, 128, 32767, 65535], dtype=np.uint16)).tolist() == [0, 0, 127, 255]


def tar_bytes(members: dict[str, bytes], end_marker: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if not end_marker:  # cut right after the last member: tarfile alone reads it as a normal end
        data = data[: 512 * (1 + -(-len(members[list(members)[-1]]) // 512)) * len(members)]
    return data


def test_read_shard_groups_members_and_catches_a_cut_between_members(tmp_path):
    members = {"a.image.png": b"x" * 10, "a.mask.png": b"m", "b.image.jpg": b"y", "b.mask.png": b"n"}
    path = tmp_path / "s-000000.tar"
    path.write_bytes(tar_bytes(members))
    samples = list(read_shard(path))
    assert [s["__key__"] for s in samples] == ["a", "b"] and samples[1]["image.jpg"] == b"y"
    assert [name for name, _ in read_members(path)] == list(members)
    path.write_bytes(tar_bytes(members, end_marker=False))
    got = []
    with pytest.raises(ShardError, match="after 1 samples"):
        for sample in read_shard(path):
            got.append(sample["__key__"])
    assert got == ["a"]  # the sample before the damage was read, the one in progress dropped


def test_make_sample_is_what_read_shard_yields(tmp_path):
    sample = make_sample("k", "/data/k.png", b"img", "image.png", b"mask")
    assert sample == {"__key__": "k", "__url__": "/data/k.png", "image.png": b"img", "mask.png": b"mask"}


def test_raw_images_decode_only_when_their_bytes_match_the_recorded_shape():
    from segdist.data.sample import CorruptSample, decode_image, decode_sample
    from segdist.data.shards import encode_png, encode_raw

    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = encode_raw(image)
    assert np.array_equal(decode_image(data), image)
    assert decode_image(data[:-1]) is None and decode_image(data + b"\0") is None  # cut or padded
    assert decode_image(encode_raw(image[:, :, :1].repeat(4, axis=2))) is None  # not 3 channels
    sample = {"__key__": "k", "__url__": "s.tar", "image.npy": data[:-3], "mask.png": encode_png(np.zeros((5, 7), np.uint8))}
    with pytest.raises(CorruptSample, match="sample k in s.tar has an image that does not decode"):
        decode_sample(sample, 2, 255)


def test_raw_masks_decode_only_when_their_bytes_match_the_recorded_shape():
    from segdist.data.sample import CorruptSample, decode_mask, decode_sample
    from segdist.data.shards import encode_mask, encode_raw

    mask = np.random.default_rng(0).integers(0, 3, (5, 7)).astype(np.uint8)
    data = encode_mask(mask, 3, "raw")
    assert np.array_equal(decode_mask(data), mask) and decode_mask(data).flags.writeable
    assert np.array_equal(decode_mask(encode_mask(mask, 300, "raw")), mask.astype(np.uint16))  # 16-bit beyond 255 classes
    with pytest.raises(ValueError):
        decode_mask(data[:-1])
    sample = {"__key__": "k", "__url__": "s.tar", "image.npy": encode_raw(np.zeros((5, 7, 3), np.uint8)), "mask.npy": data + b"\0"}
    with pytest.raises(CorruptSample, match="sample k in s.tar has a mask that does not decode"):
        decode_sample(sample, 3, 255)


def test_stray_label_finds_what_label_counts_finds():
    from segdist.data.sample import stray_label

    rng = np.random.default_rng(1)
    for dtype, classes, ignore in ((np.uint8, 4, 255), (np.uint8, 21, 0), (np.uint8, 4, 100), (np.uint16, 300, 1000)):
        for extra in (None, classes, classes + 7, 200):
            for with_ignore in (True, False):
                mask = rng.integers(0, classes, (37, 53)).astype(dtype)
                if with_ignore:
                    mask[:3] = ignore
                if extra is not None:
                    mask[5, 7] = extra
                want = extra if extra is not None and extra >= classes and extra != ignore else None
                assert stray_label(mask, classes, ignore) == label_counts(mask, classes, ignore)[1] == want


def test_raw_headers_are_read_as_numpy_reads_them():
    """`.npy` headers as np.save writes them take the fast path; any other spelling numpy's reader."""
    import io

    from segdist.data.sample import _NPY_HEADER, _npy_header

    for array in (np.zeros((281, 384, 3), np.uint8), np.zeros((5, 7), np.uint16), np.zeros((70000, 1), np.uint8),
                  np.zeros((3,), np.uint8), np.asfortranarray(np.zeros((4, 6), np.uint8))):
        buf = io.BytesIO()
        np.save(buf, array)
        data = buf.getvalue()
        buf.seek(0)
        np.lib.format.read_magic(buf)
        assert _npy_header(data) == (*np.lib.format.read_array_header_1_0(buf), buf.tell())
        assert _NPY_HEADER.fullmatch(data, 10, buf.tell()) is not None
    header = b"{'shape': (2, 3), 'fortran_order': False, 'descr': '|u1'}"  # valid, spelled otherwise
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(6)
    assert _npy_header(data) == ((2, 3), False, np.dtype(np.uint8), 10 + len(header))
    assert _npy_header(b"\x93NUMPY\x01\x00\x05\x00{bad}") is None


def test_jpegs_decode_reduced_for_training_with_their_masks_shrunk_to_match():
    from segdist.data.sample import decode_image, decode_sample
    from segdist.data.shards import encode_jpeg, encode_png

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (100, 203, 3), dtype=np.uint8)
    mask = np.repeat(np.arange(203, dtype=np.uint8)[None] % 3, 100, axis=0)
    jpeg = encode_jpeg(image, 90)
    for k in (2, 4, 8):
        assert decode_image(jpeg, k).shape == (-(-100 // k), -(-203 // k), 3)
    assert decode_image(encode_png(image), 4).shape == image.shape  # only JPEG decodes reduced
    sample = {"__key__": "k", "__url__": "s.tar", "image.jpg": jpeg, "mask.png": encode_png(mask)}
    _, small, small_mask = decode_sample(sample, 3, 255, reduce_for=lambda h, w: 4)
    assert small.shape[:2] == small_mask.shape == (25, 51)
    assert set(np.unique(small_mask)) <= {0, 1, 2}
    _, full, full_mask = decode_sample(sample, 3, 255)
    assert full.shape[:2] == full_mask.shape == (100, 203)
    bad = dict(sample, **{"mask.png": encode_png(mask[:, :200])})  # the size check sees the full frame
    with pytest.raises(UserError, match=r"image \(100, 203\) and mask \(100, 200\) differ"):
        decode_sample(bad, 3, 255, reduce_for=lambda h, w: 4)


# -- reading one sample by position ---------------------------------------------------------------
def indexed_samples(manifest):
    """(source, key, members) of every sample of a split, in shard order."""
    return [(src, key, members) for info, src in zip(manifest.shards, manifest.sources()) for key, members in info.members]


def test_read_sample_gives_what_read_shard_gives_for_every_sample_in_any_order(shapes_root):
    import random

    from segdist.data.manifest import load_manifest
    from segdist.data.sample import read_sample

    manifest = load_manifest(shapes_root, "train")
    scanned = {s["__key__"]: s for src in manifest.sources() for s in read_shard(src)}
    order = indexed_samples(manifest)
    random.Random(0).shuffle(order)
    for src, key, members in order:
        assert read_sample(src, key, members) == scanned[key]
        assert read_sample(src.address, key, members) == scanned[key]  # a path: the same, __url__ included
    assert len(order) == len(scanned) == 48


def test_read_sample_of_a_truncated_shard_is_a_corrupt_sample(shapes_root, tmp_path):
    from segdist.data.manifest import load_manifest
    from segdist.data.sample import CorruptSample, read_sample

    manifest = load_manifest(shapes_root, "val7")
    info, path = manifest.shards[0], tmp_path / manifest.shards[0].file
    data = (shapes_root / info.file).read_bytes()
    (first, first_members), (second, second_members) = info.members[:2]
    cut = second_members[-1][1] - 10  # inside the second sample's last member
    path.write_bytes(data[:cut])
    assert read_sample(path, first, first_members)["image.png"] == data[first_members[0][1]:][:first_members[0][2]]
    with pytest.raises(CorruptSample, match=rf"^sample {second} in {path} is cut short: the shard holds \d+ of its "
                                            rf"\d+ bytes from byte {second_members[0][1]}; run launch/shard.py verify"):
        read_sample(path, second, second_members)
    with pytest.raises(UserError, match=rf"shard {tmp_path}/gone.tar cannot be opened \(No such file or directory\)"):
        read_sample(tmp_path / "gone.tar", first, first_members)


def _read_in_child(args) -> tuple[int, bool]:
    """(files the worker's cache held before this read, whether it read the sample right)."""
    from segdist.data.sample import _OPEN_SHARDS, read_sample

    held = len(_OPEN_SHARDS._fds)
    src, key, members, want = args
    return held, read_sample(src, key, members) == want


def test_read_sample_keeps_a_few_files_open_and_a_forked_worker_its_own(shapes_root):
    import multiprocessing
    import os

    from segdist.data.manifest import load_manifest
    from segdist.data.sample import _OPEN_SHARDS, _OpenShards, read_sample

    manifest = load_manifest(shapes_root, "train")
    (src, key, members), *_ = indexed_samples(manifest)
    want = read_sample(src, key, members)
    assert str(src.address) in _OPEN_SHARDS._fds  # opened in this process, kept open
    with multiprocessing.get_context("fork").Pool(1) as pool:  # as a DataLoader forks its workers
        # none of the parent's files at first; then its own, kept open
        assert pool.map(_read_in_child, [(src, key, members, want)] * 2, chunksize=1) == [(0, True), (1, True)]
    assert read_sample(src, key, members) == want  # the parent's descriptor is still good

    paths = manifest.shard_paths()[:3]
    lru = _OpenShards(size=2)
    firsts = [shard.members[0][1][0] for shard in manifest.shards[:3]]  # [kind, offset, size] of a member
    got = [lru.read(p, off - 512, n + 512, [[kind, off, n]]) for p, (kind, off, n) in zip(paths, firsts)]
    assert got == [(n + 512, {kind: p.read_bytes()[off:off + n]}) for p, (kind, off, n) in zip(paths, firsts)]
    assert list(lru._fds) == [str(p) for p in paths[1:]]
    assert lru.read(paths[1], 512, 3, []) == (3, {}) and list(lru._fds)[-1] == str(paths[1])
    size = paths[1].stat().st_size
    assert lru.read(paths[1], size - 2, 5, [])[0] == 2  # where the file ends first: short
    with pytest.raises(ValueError, match="the tar header before byte 1 holds"):  # not where a member's data starts
        lru.read(paths[0], 0, 5, [["a", 1, 3]])
    fds = list(lru._fds.values())
    lru.forget()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
