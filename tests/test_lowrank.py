"""The factor-only maths against dense linear algebra on small random shapes."""

from __future__ import annotations

import pytest
import torch

from madapt.lowrank import LowRankError, exact_merge, stacked_factors, svd_merge, truncated_svd


def lora(d_out: int, d_in: int, r: int, alpha: float, modules=("q", "v"), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"] = torch.randn(r, d_in, generator=generator)
        tensors[f"{m}.lora_B.weight"] = torch.randn(d_out, r, generator=generator)
    return {"r": r, "lora_alpha": alpha, "target_modules": list(modules)}, tensors


def dense(config, tensors, module):
    return (
        (config["lora_alpha"] / config["r"])
        * tensors[f"{module}.lora_B.weight"].double()
        @ tensors[f"{module}.lora_A.weight"].double()
    )


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_truncated_svd_equals_dense_svd(shape):
    generator = torch.Generator().manual_seed(3)
    b = torch.randn(shape[0], 12, generator=generator, dtype=torch.float64)
    a = torch.randn(12, shape[1], generator=generator, dtype=torch.float64)
    new_b, new_a, s = truncated_svd(b, a, rank=5)
    u, s_dense, vh = torch.linalg.svd(b @ a)
    torch.testing.assert_close(s, s_dense[:12])
    torch.testing.assert_close(new_b @ new_a, (u[:, :5] * s_dense[:5]) @ vh[:5])
    assert new_b.shape == (shape[0], 5) and new_a.shape == (5, shape[1])


def test_truncated_svd_pads_when_the_product_has_lower_rank():
    b, a = torch.randn(20, 3, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    new_b, new_a, _ = truncated_svd(b, a, rank=8)
    assert new_b.shape == (20, 8) and not new_b[:, 3:].any() and not new_a[3:].any()
    torch.testing.assert_close(new_b @ new_a, b @ a)


def test_exact_merge_sums_deltas_including_modules_only_one_source_adapts():
    first, second = lora(24, 16, 4, 8.0, seed=1), lora(24, 16, 2, 2.0, modules=("q", "k"), seed=2)
    config, tensors = exact_merge([first, second], [0.25, 0.75])
    assert config["r"] == 6 and config["lora_alpha"] == 6 and config["target_modules"] == ["k", "q", "v"]
    expected = {
        "q": 0.25 * dense(*first, "q") + 0.75 * dense(*second, "q"),
        "v": 0.25 * dense(*first, "v"),
        "k": 0.75 * dense(*second, "k"),
    }
    for module, delta in expected.items():
        product = tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()
        torch.testing.assert_close(product, delta, rtol=1e-5, atol=1e-5)


def test_svd_merge_reports_the_spectrum_of_the_exact_sum():
    sources = [lora(24, 16, 4, 8.0, seed=1), lora(24, 16, 4, 4.0, seed=2)]
    _, spectra = svd_merge(sources, [0.5, 0.5], rank=4)
    b, a = stacked_factors(sources, [0.5, 0.5])["q"]
    torch.testing.assert_close(spectra["q"], torch.linalg.svdvals(b @ a)[:8])


def test_rslora_scale_and_refusals():
    config, tensors = lora(8, 8, 4, 8.0)
    (_, merged) = exact_merge([({**config, "use_rslora": True}, tensors)], [1.0])
    product = merged["q.lora_B.weight"].double() @ merged["q.lora_A.weight"].double()
    torch.testing.assert_close(product, dense(config, tensors, "q") * 2.0)  # alpha/sqrt(r) = 2 * alpha/r at r=4
    with pytest.raises(LowRankError, match="bias"):
        exact_merge([(config, {**tensors, "q.bias": torch.zeros(8)})], [1.0])
    with pytest.raises(LowRankError, match="rank_pattern"):
        exact_merge([({**config, "rank_pattern": {"q": 2}}, tensors)], [1.0])


@pytest.mark.parametrize(
    "first",
    [{"target_modules": r".*\.(q_proj|o_proj)"}, {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [0]}],
    ids=["regular expression", "one layer"],
)
def test_a_merge_whose_source_narrows_its_targets_targets_exactly_the_merged_modules(tiny_model, first):
    """PEFT's string form of target_modules is one regular expression, and layers_to_transform narrows a list:
    neither speaks for the other source, so a merge names the modules it holds."""
    from peft import LoraConfig, get_peft_model

    from madapt.compat.peft import targeted
    from madapt.lora import extract, to_peft_config
    from madapt.models import load_base

    sources = []
    for options in (first, {"target_modules": ["v_proj"]}):
        config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options)
        sources.append(extract(get_peft_model(load_base(tiny_model).model, config), "default"))
    config, tensors = exact_merge(sources, [0.5, 0.5])
    merged = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for key in tensors}
    merged = {module for module in merged if not module.endswith(".lora_B.weight")}
    paths = [name for name, _ in load_base(tiny_model).model.named_modules()]
    assert len(merged) == (6 if "layers_to_transform" not in first else 4)
    assert sorted(targeted(to_peft_config(config), paths)) == sorted(merged)
