"""`madapt bench merge --small` runs end to end, so the benchmark cannot rot; it also checks its maths."""

from __future__ import annotations

import json

from madapt.bench.merge import main


def test_small_merge_benchmark_writes_results_with_exact_answers(tmp_path, capsys):
    assert main(["--small", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "merge-small.json").read_text())
    rows = {(r["modules"], r["merge"]): r for r in result["rows"]}
    assert set(rows) == {(m, k) for m in ("q,v", "q,k,v,o,gate,up,down") for k in ("svd", "linear")}
    for (_, merge), row in rows.items():
        assert row["peft_s"] > 0 and row["madapt_s"] > 0
        if merge == "svd":
            assert row["max_singular_value_rel_error"] < 1e-4
        else:
            assert row["madapt_rel_error"] < 1e-6 < 0.1 < row["peft_rel_error"]  # PEFT's cross terms
    assert "| q,v | svd (dense SVD) |" in (tmp_path / "merge-small.md").read_text()
    assert "extrapolated" in capsys.readouterr().out
