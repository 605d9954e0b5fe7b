"""bench/attention_kernels.py on a small stack: both kernels traced like the decoder, run in place, and agreeing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention_kernels  # bench/ is a folder of scripts, not a package


def test_the_kernel_race_runs_both_kernels_and_writes_its_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kernels.json"
    args = ["--layers", "2", "--contexts", "8", "40", "--steps", "2", "--rounds", "1", "--json", str(out)]
    assert attention_kernels.main(args) == 0  # it stops when the kernels' outputs disagree
    result = json.loads(out.read_text())
    assert [row["kernel"] for row in result["rows"]] == ["grouped", "gqa"]
    assert all(set(row["ms"]) == {"8", "40"} and row["ms"]["8"] > 0 for row in result["rows"])
    assert [f["context"] for f in result["floor"]] == [8, 40]
    assert result["floor"][1]["cache_mib"] == 2 * 2 * 2 * 40 * 64 * 4 / (1 << 20)
    assert "numpy read" in capsys.readouterr().out
