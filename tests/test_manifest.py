"""The manifest `<root>/<split>.json`: read back as written; every problem one line naming the file."""

import json

import pytest

from segdist.data.manifest import check_indexed, check_random_access, load_manifest, manifest_path, sha256_file
from segdist.errors import UserError


def test_reads_what_the_converter_wrote(shapes_root):
    m = load_manifest(shapes_root, "val7")
    assert (m.dataset, m.split, m.num_samples, len(m.shards)) == ("shapes", "val7", 7, 3)
    assert m.num_classes == 4 == len(m.palette) and m.ignore_index == 255
    assert m.valid_pixels == sum(m.class_pixels) > 0 and all(p.is_file() for p in m.shard_paths())
    again = json.loads(manifest_path(shapes_root, "val7").read_text())
    assert m.to_json() == again
    assert m.sha256 == sha256_file(manifest_path(shapes_root, "val7")) and "sha256" not in m.to_json()


def copy_split(shapes_root, tmp_path, change) -> str:
    raw = json.loads(manifest_path(shapes_root, "val7").read_text())
    for shard in raw["shards"]:
        (tmp_path / shard["file"]).write_bytes((shapes_root / shard["file"]).read_bytes())
    change(raw)
    manifest_path(tmp_path, "val7").write_text(json.dumps(raw))
    return "val7"


@pytest.mark.parametrize("change, needle", [
    (lambda raw: raw.update(format="other/1"), "is corrupt (format 'other/1'"),
    (lambda raw: raw.pop("classes"), "is corrupt ('classes')"),
    (lambda raw: raw.update(num_samples=8), "shard sample counts do not add up"),
    (lambda raw: raw.update(num_samples=0, shards=[]), "is empty"),
    (lambda raw: raw["shards"][0].update(file="gone.tar"), "gone.tar listed in"),
    (lambda raw: raw["shards"][0]["members"].pop(), "is corrupt (shard val7-000000.tar records the members of 2 samples, not 3)"),
    (lambda raw: raw["shards"][1]["members"][0].pop(), "is corrupt (not enough values to unpack"),
    (lambda raw: raw["shards"][1]["members"][0][1][0].pop(), "is corrupt (not enough values to unpack"),
    (lambda raw: raw["shards"][1]["members"][0][1][0].__setitem__(1, -5), "negative offset or size for sample"),
    (lambda raw: raw["shards"][2]["members"][0].__setitem__(1, []), "records no members or a negative"),
])
def test_a_bad_manifest_is_one_line(shapes_root, tmp_path, change, needle):
    split = copy_split(shapes_root, tmp_path, change)
    with pytest.raises(UserError) as err:
        load_manifest(tmp_path, split)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_missing_root_or_split_says_how_to_convert(tmp_path):
    with pytest.raises(UserError, match="does not exist: convert a dataset there"):
        load_manifest(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match=r"--split train --out"):
        load_manifest(tmp_path, "train")


def test_located_gives_every_samples_shard_key_and_members_in_manifest_order(shapes_root):
    m = load_manifest(shapes_root, "val7")
    where = m.located()
    expected = [(src, key, members) for src, info in zip(m.sources(), m.shards) for key, members in info.members]
    assert len(where) == m.num_samples == len(expected)
    assert [where[i] for i in range(len(where))] == expected
    assert where.offset.dtype == "int64" and where.keys.dtype.kind == "U"  # arrays, not a list per sample


def test_member_offsets_are_read_and_their_absence_says_how_to_add_them(shapes_root, tmp_path):
    m = load_manifest(shapes_root, "val7")
    assert m.indexed and [len(s.members) for s in m.shards] == [s.samples for s in m.shards]
    key, members = m.shards[0].members[0]
    assert [kind for kind, _, _ in members] == ["image.png", "mask.png"] and members[0][1] == 512
    check_indexed(m)
    check_random_access(m)

    def strip(raw):
        for shard in raw["shards"][1:]:
            del shard["members"]

    split = copy_split(shapes_root, tmp_path, strip)
    old = load_manifest(tmp_path, split)
    assert not old.indexed and old.shards[0].members is not None and old.shards[1].members is None
    assert "members" not in old.to_json()["shards"][1]  # absent, as in a manifest converted before
    with pytest.raises(UserError) as err:
        check_random_access(old)
    assert str(err.value) == (
        f"manifest {tmp_path}/val7.json records no member offsets (converted before segdist recorded them), which "
        f"reading samples by position needs: re-run launch/shard.py, or run launch/shard.py index {tmp_path}, a "
        "cheap pass that adds them without re-encoding")


def test_a_pipe_root_reads_by_position_only_through_a_cache(shapes_root, tmp_path):
    piped = load_manifest(f"pipe:cat {shapes_root}/{{name}}", "val7")
    with pytest.raises(UserError, match=r"^data.root 'pipe:cat .*/\{name\}' is a pipe: command, which cannot read "
                                        r"one sample of a shard: set data.cache_dir"):
        check_random_access(piped)
    check_random_access(load_manifest(f"pipe:cat {shapes_root}/{{name}}", "val7", cache_dir=str(tmp_path)))
