"""The user guides build with `mkdocs build --strict`: a broken link or anchor, a page missing from
the navigation or a snippet whose file is gone fails here, as it would fail `make docs`."""

import os
import subprocess
import sys

from conftest import ROOT


def test_the_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "design-notes" / "index.html").is_file()


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for page in ("getting-started", "data", "recipes", "training", "evaluation", "predict-export", "slurm",
                 "design-notes", "benchmarks"):
        assert f"docs/{page}.md" in readme, page
