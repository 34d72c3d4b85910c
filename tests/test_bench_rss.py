import re
import subprocess
import sys

import pytest

from conftest import ROOT
from segdist.bench import build_parser

TINY = ["data", "--rss", "--rss-counts", "16", "48", "--rss-size", "16", "16", "--batch-size", "4",
        "--workers", "1", "--rounds", "1", "--samples-per-shard", "8"]


@pytest.mark.slow
def test_rss_bench_measures_every_split_through_the_loader(capsys, tmp_path):
    args = build_parser().parse_args([*TINY, "--workdir", str(tmp_path)])
    assert args.run(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loader memory: splits of 16, 48 samples of 16x16, 8 per shard; 12 batches of 4 "
                             "for every split (1 x the largest), 1 workers")
    rows = {}
    for line in out[2:4]:
        match = re.fullmatch(r"\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([+-][\d.]+)%", line)
        assert match, line
        rows[int(match.group(1))] = [float(v) for v in match.groups()[1:]]
    assert sorted(rows) == [16, 48]
    for manifest_kb, main_rss, main_pss, workers_pss, total, _spread, _pct in rows.values():
        assert main_rss > 50 and main_pss > 0 and workers_pss > 0  # a torch process holds far more than 50 MiB
        # the peak of the sum lies between the larger peak and the sum of the peaks (0.1 MiB rounding)
        assert max(main_pss, workers_pss) - 0.1 <= total <= main_pss + workers_pss + 0.2
    assert rows[16][6] == 0.0
    assert rows[48][0] >= rows[16][0]  # the bigger split's manifest lists more samples
    # the splits it measured stay in --workdir, converted with a manifest
    assert len(list((tmp_path / "rss-48").glob("train-*.tar"))) == 6


def test_bad_rss_option_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), *TINY[:3], "2", "48"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --rss-counts 2 is below --batch-size 8: the stream needs a full batch"
