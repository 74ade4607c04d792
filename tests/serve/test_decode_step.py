"""The flat decode step (`madapt.serve.decode_step`) computes the model forward's logits and KV cache to the
bit, for base rows and rows with adapters of mixed ranks, fused or unfused Linears, with or without biases;
where it does not cover a step it says so before writing anything."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from madapt.serve import native
from madapt.serve.cpu_gemm import use_onednn
from madapt.serve.decode_attention import use_decode_attention
from madapt.serve.decode_step import decode_logits
from madapt.serve.kv_cache import growing_cache
from madapt.serve.multilora import BASE_SLOT, AdaptedModule, AdapterMatrices, MultiLora, RowAdapters, RowView
from madapt.serve.native_layers import use_native_layers
from tests.helpers import small_llama

ROWS, PROMPT, STEPS = 4, 6, 5
TARGETS = {4: ("q_proj", "v_proj"), 8: ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")}


def llama(bias: bool) -> LlamaForCausalLM:
    return small_llama(attention_bias=bias, mlp_bias=bias)


def random_adapter(model: LlamaForCausalLM, ref: str, rank: int) -> AdapterMatrices:
    """Random factors at `rank` on `TARGETS[rank]` of every layer (large enough to change the tokens)."""
    modules = {}
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in TARGETS[rank]:
            a, b = torch.randn(module.in_features, rank), torch.randn(rank, module.out_features)
            modules[path] = (a * 0.3, b * 0.3)
    return AdapterMatrices(ref, modules)


def on_kernels(model: LlamaForCausalLM, *, prepack: bool = True) -> None:
    assert native.load()
    use_onednn(model, prepack=prepack)
    use_decode_attention(model, kernel=True)
    use_native_layers(model)


def prefilled(model: LlamaForCausalLM, lora: MultiLora, adapters: RowAdapters) -> tuple[DynamicCache, torch.Tensor]:
    ids = torch.randint(0, 64, (ROWS, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0  # left-padded rows
    cache = growing_cache(model.config)
    with lora.forward_rows(adapters, 0, ROWS):
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
    return cache, mask


def layer_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prepack", [True, False], ids=["fused", "unfused"])
def test_the_flat_step_gives_the_model_forward_s_logits_and_cache_to_the_bit(bias, prepack):
    model = llama(bias)
    lora = MultiLora(model)
    slots = [lora.load(adapter) for adapter in [random_adapter(model, f"r{rank}", rank) for rank in TARGETS]]
    on_kernels(model, prepack=prepack)
    lora.kernel = True
    adapters = RowAdapters(lora)
    adapters.add([slots[0], BASE_SLOT, slots[1], slots[0]])  # mixed ranks, a base row
    runs = []
    with torch.inference_mode():
        for flat in (False, True):
            cache, mask = prefilled(model, lora, adapters)
            tokens, positions = torch.tensor([3, 9, 27, 60]), mask.sum(-1)
            logits_per_step = []
            for _ in range(STEPS):
                mask = torch.cat([mask, mask.new_ones(ROWS, 1)], dim=-1)
                with lora.forward_rows(adapters, 0, ROWS):
                    if flat:
                        logits = decode_logits(model, tokens, positions, mask, cache, adapters.view(0, ROWS))
                        assert logits is not None
                    else:
                        out = model(
                            input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache
                        )
                        logits = out.logits[:, -1]
                logits_per_step.append(logits)
                tokens, positions = logits.argmax(-1), positions + 1
            runs.append((logits_per_step, layer_tensors(cache)))
    (want_logits, want_cache), (got_logits, got_cache) = runs
    for want, got in zip(want_logits + want_cache, got_logits + got_cache, strict=True):
        assert torch.equal(got, want)
    assert len({tuple(step.argmax(-1).tolist()) for step in got_logits}) > 1  # the steps differ: a real run
    assert len(set(got_logits[-1].argmax(-1).tolist())) > 1  # and so do the rows


def test_the_flat_step_leaves_a_step_it_does_not_cover_to_the_model_with_nothing_written():
    model = llama(bias=False)
    lora = MultiLora(model)
    slot = lora.load(random_adapter(model, "r4", 4))
    on_kernels(model)
    lora.kernel = True
    adapters = RowAdapters(lora)
    adapters.add([slot, BASE_SLOT, slot, BASE_SLOT])
    view = adapters.view(0, ROWS)
    assert view is not None and view.products
    stray = AdaptedModule(torch.nn.Linear(64, 64))  # adapted, but no Linear of this model
    tokens = torch.tensor([1, 2, 3, 4])
    with torch.inference_mode():
        cache, mask = prefilled(model, lora, adapters)
        before = layer_tensors(cache)
        mask = torch.cat([mask, mask.new_ones(ROWS, 1)], dim=-1)
        positions = mask.sum(-1) - 1

        def covered(**change: object) -> bool:
            args = {"model": model, "tokens": tokens, "positions": positions, "mask": mask, "cache": cache}
            args["view"] = view
            logits = decode_logits(**{**args, **change})  # type: ignore[arg-type]
            after = layer_tensors(cache)
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) or logits is not None
            return logits is not None

        assert not covered(mask=mask[:, 1:])  # not as wide as the cache and the new column
        assert not covered(cache=DynamicCache(config=model.config))  # transformers' cache, not madapt's
        assert not covered(view=RowView(view.products, {slot: torch.tensor([0])}, kernel=True))  # PEFT's path
        assert not covered(view=RowView(view.products, {}, kernel=False))  # factors the kernel cannot take
        assert not covered(view=RowView({**view.products, stray: view.products[next(iter(view.products))]}, {}, True))
        use_decode_attention(model, kernel=False)
        assert not covered()  # the attention on matmuls, not the kernel
        use_decode_attention(model, kernel=True)
        use_native_layers(model, on=False)
        assert not covered()
        use_native_layers(model)
        with torch.enable_grad():
            assert not covered()
        model.train()
        assert not covered()
        model.eval()
        assert covered()  # all restored: it runs


@pytest.mark.parametrize("features", [5, 64, 576])
def test_the_add_norm_kernel_is_torch_s_add_then_the_norm_kernel_to_the_bit(features):
    assert native.load()
    generator = torch.Generator().manual_seed(features)
    x, delta = torch.randn(7, features, generator=generator), torch.randn(7, features, generator=generator) * 1e-3
    weight = torch.randn(features, generator=generator)
    total, normed = torch.ops.madapt_cpu.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    assert torch.equal(normed, torch.ops.madapt_cpu.rms_norm(x + delta, weight, 1e-5))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.madapt_cpu.add_rms_norm(x, delta.t().contiguous().t(), weight, 1e-5)
