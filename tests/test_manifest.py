"""The manifest `<root>/<split>.json`: read back as written; every problem one line naming the file."""

import json

import pytest

from segdist.data.manifest import load_manifest, manifest_path
from segdist.errors import UserError


def test_reads_what_the_converter_wrote(shapes_root):
    m = load_manifest(shapes_root, "val7")
    assert (m.dataset, m.split, m.num_samples, len(m.shards)) == ("shapes", "val7", 7, 3)
    assert m.num_classes == 4 == len(m.palette) and m.ignore_index == 255
    assert m.valid_pixels == sum(m.class_pixels) > 0 and all(p.is_file() for p in m.shard_paths())
    again = json.loads(manifest_path(shapes_root, "val7").read_text())
    assert m.to_json() == again


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
