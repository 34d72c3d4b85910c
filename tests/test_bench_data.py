import re
import subprocess
import sys

from conftest import ROOT
from segdist.bench import build_parser

TINY = ["data", "--count", "6", "--size", "64", "128", "--crop", "32", "64", "--batch-size", "2",
        "--batches", "2", "--warmup", "1", "--rounds", "1", "--workers", "1", "--samples-per-shard", "2"]


def test_data_bench_prints_every_row_with_positive_figures(capsys, tmp_path):
    args = build_parser().parse_args([*TINY, "--workdir", str(tmp_path)])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data throughput: 6 frames of 128x64 (W x H), preset 'cityscapes'")
    rows = {}
    for line in out[2:6]:
        match = re.fullmatch(r"(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", line)
        assert match, line
        rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    assert sorted(rows) == ["folder of PNG files", "shards, JPEG q90 images", "shards, PNG images",
                            "shards, PNG, scanned"]
    assert all(v > 0 for figures in rows.values() for v in figures)
    assert rows["folder of PNG files"][5] == 1.0
    # by offset a sample reads its members only; scanned, the tar headers and end too
    assert rows["shards, PNG images"][1] < rows["shards, PNG, scanned"][1]
    assert re.fullmatch(r"JPEG over PNG shards: [\d.]+x less CPU per sample in one process, [\d.]+x in the "
                        r"loader, [\d.]+x the samples/s", out[6])
    assert re.fullmatch(r"PNG shards by offset over scanned: [\d.]+x the samples/s, [\d.]+x the bytes read per sample",
                        out[7])
    # the data it measured: 6 frames per source, shards with a manifest
    assert len(list((tmp_path / "folder").glob("*_mask.png"))) == 6
    assert (tmp_path / "jpg" / "train.json").is_file() and len(list((tmp_path / "png").glob("train-*.tar"))) == 3


def test_bad_option_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "data", "--count", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --count 2 is below --batch-size 8: the stream needs a full batch"


def test_too_few_shards_for_the_workers_is_refused_before_anything_is_written(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "data", "--count", "8",
                             "--batch-size", "4", "--samples-per-shard", "8", "--workers", "2", "--workdir", str(work)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --count 8 at --samples-per-shard 8 makes 1 shards for 2 workers: "
                                     "lower --samples-per-shard or --workers")
    assert not work.exists()
