"""The faster decode step's parts compute what they replace: the growing KV cache the same keys and values
as transformers' concatenation, whatever `DecodeBatch` does to it between steps; oneDNN's Linears, fused
siblings among them, what `F.linear` does; the decode attention (two matmuls, madapt's C++ kernel) what SDPA
does; each the same for a row alone as in a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from madapt.compat.torch import detached_copy
from madapt.serve import native
from madapt.serve.cpu_gemm import FusedOneDnnLinear, OneDnnLinear, PackedOneDnnLinear, use_onednn
from madapt.serve.decode_attention import ATTENTION, KERNEL_ATTENTION, decode_attention_forward, use_decode_attention
from madapt.serve.kv_cache import HEADROOM, GrowingLayer
from madapt.serve.native_layers import NativeGatedMlp, NativeRMSNorm, use_native_layers
from tests.helpers import small_llama


def test_a_growing_layer_holds_what_concatenation_holds_through_joins_and_leaves():
    generator = torch.Generator().manual_seed(0)

    def states(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, 3, columns, 4, generator=generator)

    layer, keys = GrowingLayer(), states(5, 7)
    layer.update(keys, keys.clone())
    buffer = layer.buffers["keys"]
    for step in range(HEADROOM + 10):  # past the first buffer's room: one reallocation
        if step == 20:  # two rows leave without a cut: the leading rows of the same buffer
            layer.keys, layer.values, keys = layer.keys[:3], layer.values[:3], keys[:3]
        if step == 30:  # columns cut off the left: not a prefix any more, copied at the next step
            layer.keys, layer.values, keys = layer.keys[:, :, 2:], layer.values[:, :, 2:], keys[:, :, 2:]
        new = states(len(keys), 1)
        got_keys, got_values = layer.update(new, new.clone())
        keys = torch.cat([keys, new], dim=-2)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, keys)
        if step == 25:
            assert layer.buffers["keys"] is buffer  # a step and a leave without a cut copied nothing
    assert layer.get_seq_length() == keys.shape[2]


@pytest.mark.parametrize("prepack", [True, False])
def test_onednn_linears_compute_f_linear_and_give_a_row_alone_what_it_gets_in_a_batch(prepack):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(6, 3, 16)
    kind = PackedOneDnnLinear if prepack else OneDnnLinear
    with torch.inference_mode():
        expected = model(x)
        assert use_onednn(model, prepack=prepack) == 2 and all(type(m) is kind for m in (model[0], model[2]))
        got = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, alone)
    assert ("_packed" in model[0].__dict__) is prepack
    assert use_onednn(model, on=False) == 2 and type(model[0]) is nn.Linear and "_packed" not in model[0].__dict__
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_a_packed_weight_follows_its_weight_changed_in_place_or_replaced():
    torch.manual_seed(0)
    linear, x = nn.Linear(16, 8), torch.randn(4, 16)
    use_onednn(linear)
    with torch.no_grad():
        linear(x)
        linear.weight.mul_(2)  # in place: the next forward packs again
        torch.testing.assert_close(linear(x), functional.linear(x, linear.weight, linear.bias))
        linear.weight = nn.Parameter(torch.randn(8, 16))
        torch.testing.assert_close(linear(x), functional.linear(x, linear.weight, linear.bias))


class Siblings(nn.Module):
    """Attention's three projections and a gated MLP's two halves, on one input."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, n, bias=bias) for n in (24, 8, 8))
        self.gate_proj, self.up_proj = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.members = [self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x) * self.up_proj(x)], -1)


@pytest.mark.parametrize("bias", [True, False])
def test_sibling_linears_run_as_one_gemm_that_gives_each_the_bits_of_its_own(bias):
    torch.manual_seed(0)
    block, x = Siblings(bias), torch.randn(6, 3, 16)
    with torch.inference_mode():
        expected = block(x)
        alone_gemms = [
            torch.ops.mkldnn._linear_pointwise(
                x, torch.ops.mkldnn._reorder_linear_weight(m.weight, 32), m.bias, "none", [], ""
            )
            for m in block.members
        ]
        assert use_onednn(block) == 5 and all(type(m) is FusedOneDnnLinear for m in block.members)
        assert not any("_packed" in m.__dict__ for m in block.members)  # the group's packed copy only
        got = block(x)
        outputs = [m(x) for m in block.members]  # each on the same input: the first computes, the rest take
        alone = torch.cat([block(x[i : i + 1]) for i in range(len(x))])
        other = torch.randn(2, 16)
        on_other = block.v_proj(other)  # another input than the group's last: computed for it
        torch.testing.assert_close(on_other, functional.linear(other, block.v_proj.weight, block.v_proj.bias))
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(outputs, alone_gemms, strict=True))
    assert torch.equal(got, alone)
    twin, own = detached_copy(block.k_proj), detached_copy(block.k_proj)  # PEFT's base-layer twins
    own.weight = nn.Parameter(torch.randn(8, 16))
    with torch.inference_mode():
        assert torch.equal(twin(x), outputs[1])  # the same weight: the group's columns
        torch.testing.assert_close(own(x), functional.linear(x, own.weight, own.bias))  # its own weight
    with torch.no_grad():
        block.k_proj.weight.mul_(2)  # in place: the group packs again
        torch.testing.assert_close(block.k_proj(x), functional.linear(x, block.k_proj.weight, block.k_proj.bias))
    assert use_onednn(block, on=False) == 5 and all(type(m) is nn.Linear for m in block.members)
    assert not any("_group" in m.__dict__ for m in block.members)


def test_onednn_linears_leave_autograd_to_f_linear():
    linear = nn.Linear(4, 2)
    use_onednn(linear)
    x = torch.randn(3, 4)
    linear(x).sum().backward()
    assert linear.weight.grad is not None
    torch.testing.assert_close(linear(x), functional.linear(x, linear.weight, linear.bias))


def test_decode_attention_computes_sdpa_and_gives_a_row_alone_what_it_gets_in_a_batch():
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, columns, dim = 5, 6, 2, 11, 8
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key, value = (torch.randn(rows, kv_heads, columns, dim, generator=generator) for _ in range(2))
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    mask[1, ..., :4] = mask[3, ..., :2] = False  # left padding
    with torch.inference_mode():
        got, _ = decode_attention_forward(module, query, key, value, mask, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        alone = torch.cat(
            [
                decode_attention_forward(
                    module, query[i : i + 1], key[i : i + 1], value[i : i + 1], mask[i : i + 1], scaling=0.3
                )[0]
                for i in range(rows)
            ]
        )
        unpadded, _ = decode_attention_forward(
            module, query[1:2], key[1:2, :, 4:], value[1:2, :, 4:], None, scaling=0.3
        )
    assert got.shape == expected.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, alone)
    torch.testing.assert_close(got[1:2], unpadded)  # padded columns weigh 0


@pytest.mark.parametrize("dim", [16, 64, 80, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3)])
@pytest.mark.parametrize("columns", [5, 16, 37])
def test_the_attention_kernel_computes_the_matmuls_and_a_row_alone_is_a_row_in_a_batch(dim, heads, kv_heads, columns):
    assert native.load(), "madapt's C++ kernels build on the project's machines (a C++ compiler with OpenMP)"
    generator = torch.Generator().manual_seed(dim + columns)
    rows = 5
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    cache = torch.randn(2, rows, kv_heads, columns + 7, dim, generator=generator)  # spare columns, as the cache
    key, value = cache[0, :, :, :columns], cache[1, :, :, :columns]
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    mask[1, ..., :4] = mask[3, ..., :1] = False  # left padding
    module = nn.Module()

    def attend(rows: slice, mask: torch.Tensor | None, cut: int = 0, kernel: bool = True) -> torch.Tensor:
        k, v = key[rows, :, cut:], value[rows, :, cut:]
        return decode_attention_forward(module, query[rows], k, v, mask, scaling=dim**-0.5, kernel=kernel)[0]

    with torch.inference_mode():
        got, matmuls = attend(slice(None), mask), attend(slice(None), mask, kernel=False)
        alone = torch.cat([attend(slice(i, i + 1), mask[i : i + 1]) for i in range(rows)])
        unpadded = attend(slice(1, 2), None, cut=4)
    assert got.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, matmuls)
    assert torch.equal(got, alone)
    assert torch.equal(got[1:2], unpadded)  # padded columns weigh exactly 0


def test_the_attention_kernel_refuses_what_it_is_not_built_for():
    assert native.load()
    query, key = torch.randn(2, 4, 16), torch.randn(2, 2, 3, 16)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.madapt_cpu.decode_attention(query.double(), key.double(), key.double(), None, 1.0)
    with pytest.raises(RuntimeError, match="head dim 20"):
        torch.ops.madapt_cpu.decode_attention(torch.randn(2, 4, 20), *[torch.randn(2, 2, 3, 20)] * 2, None, 1.0)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.madapt_cpu.decode_attention(query, key, key, torch.ones(2, 4, dtype=torch.bool), 1.0)
    nothing = torch.zeros(2, 3, dtype=torch.bool)  # every column masked: nothing to attend to
    assert torch.equal(torch.ops.madapt_cpu.decode_attention(query, key, key, nothing, 1.0), torch.zeros_like(query))


@pytest.mark.parametrize(("kernel", "implementation"), [(True, KERNEL_ATTENTION), (False, ATTENTION)])
def test_a_model_switches_to_decode_attention_and_back_and_greedy_tokens_stay(base, kernel, implementation):
    ids = base.tokenizer("def add(a, b):", return_tensors="pt").input_ids
    before = base.model.config._attn_implementation
    with torch.inference_mode():
        assert use_decode_attention(base.model, kernel=kernel) == implementation
        assert base.model.config._attn_implementation == implementation
        fast = base.model.generate(ids, max_new_tokens=12, do_sample=False)
        assert use_decode_attention(base.model, on=False) == "sdpa"
        sdpa = base.model.generate(ids, max_new_tokens=12, do_sample=False)
    use_decode_attention(base.model, before != "sdpa", kernel=before == KERNEL_ATTENTION)
    assert torch.equal(fast, sdpa)


@pytest.mark.parametrize("rank", [8, 16, 24])
def test_the_lora_kernel_adds_each_rows_own_product_the_same_in_any_batch(rank):
    assert native.load()
    generator = torch.Generator().manual_seed(rank)
    rows, features, out = 6, 40, 56
    wide = torch.randn(rows, out + 8, generator=generator)
    y, x = wide[:, :out], torch.randn(rows, features, generator=generator)  # y a slice, as a fused GEMM's
    a, b = torch.randn(rows, features, rank, generator=generator), torch.randn(rows, rank, out, generator=generator)
    picked = torch.tensor([4, 1, 3])
    with torch.inference_mode():
        every = torch.ops.madapt_cpu.lora_products(y, x, a, b, None)
        expected = torch.baddbmm(y.unsqueeze(1), torch.bmm(x.unsqueeze(1), a), b).squeeze(1)
        alone = torch.cat(
            [
                torch.ops.madapt_cpu.lora_products(y[i : i + 1], x[i : i + 1], a[i : i + 1], b[i : i + 1], None)
                for i in range(rows)
            ]
        )
        some = torch.ops.madapt_cpu.lora_products(y, x, a[picked], b[picked], picked)
    torch.testing.assert_close(every, expected)
    assert torch.equal(every, alone)
    assert torch.equal(some[picked], every[picked])  # a row's result does not depend on its class's other rows
    others = [i for i in range(rows) if i not in picked.tolist()]
    assert torch.equal(some[others], y[others])
    with pytest.raises(RuntimeError, match="row out of range"):
        torch.ops.madapt_cpu.lora_products(y, x, a[:1], b[:1], torch.tensor([rows]))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.madapt_cpu.lora_products(y.double(), x.double(), a.double(), b.double(), None)


def test_llama_form_layers_switch_to_the_kernels_and_others_keep_their_own():
    from transformers import LlamaConfig
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert native.load()
    torch.manual_seed(0)
    silu, gelu = (
        LlamaConfig(hidden_size=40, intermediate_size=72, num_attention_heads=4, hidden_act=act)
        for act in ("silu", "gelu")
    )
    layers = [LlamaRMSNorm(40, eps=1e-5), Qwen2RMSNorm(40), GemmaRMSNorm(40), LlamaMLP(silu), LlamaMLP(gelu)]
    model = nn.ModuleList(layers)
    for norm in layers[:3]:
        norm.weight.data.normal_()
    use_onednn(model)  # the MLP's gate and up: two halves of one GEMM, strided views
    x = torch.randn(3, 2, 40)
    with torch.inference_mode():
        expected = [layer(x) for layer in layers]
        assert use_native_layers(model) == 3
        got = [layer(x) for layer in layers]
        alone = [torch.cat([layer(x[i : i + 1]) for i in range(len(x))]) for layer in layers]
    assert type(layers[0]).__name__ == "LlamaRMSNorm" and isinstance(layers[0], LlamaRMSNorm)
    kinds = [NativeRMSNorm, NativeRMSNorm, None, NativeGatedMlp, None]  # Gemma: 1 + weight; a GELU MLP
    assert [next((k for k in (NativeRMSNorm, NativeGatedMlp) if isinstance(m, k)), None) for m in layers] == kinds
    for want, have, one in zip(expected, got, alone, strict=True):
        torch.testing.assert_close(have, want)
        assert torch.equal(have, one)
    assert use_native_layers(model, on=False) == 3 and type(layers[0]) is LlamaRMSNorm and type(layers[3]) is LlamaMLP
    use_native_layers(model)
    x.requires_grad_(True)
    layers[0](x).sum().backward()  # autograd: the layer's own forward
    assert x.grad is not None


@pytest.mark.parametrize("dim", [16, 64, 80])
@pytest.mark.parametrize("tokens", [1, 5])
def test_the_rotary_cache_kernel_is_transformers_rotary_to_the_bit_written_into_the_cache(dim, tokens):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    assert native.load()
    generator = torch.Generator().manual_seed(dim + tokens)
    rows, heads, kv_heads, start = 3, 6, 2, 4
    fused = torch.randn(rows, tokens, (heads + 2 * kv_heads) * dim, generator=generator)  # a fused q/k/v GEMM's
    query, key, value = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    config = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, head_dim=dim, rope_theta=10000.0)
    positions = torch.arange(start, start + tokens).repeat(rows, 1) + torch.arange(rows)[:, None]
    cos, sin = LlamaRotaryEmbedding(config)(fused, positions)
    caches = [torch.randn(rows + 1, kv_heads, start + tokens + 2, dim, generator=generator) for _ in range(2)]
    before = [cache.clone() for cache in caches]
    with torch.inference_mode():
        rotated = torch.ops.madapt_cpu.rotary_cache(query, key, value, cos, sin, *caches, start)
        q, k = (t.reshape(rows, tokens, -1, dim).transpose(1, 2) for t in (query, key))
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    new = slice(start, start + tokens)
    assert torch.equal(rotated, want_q)
    assert torch.equal(caches[0][:rows, :, new], want_k)
    assert torch.equal(caches[1][:rows, :, new], value.reshape(rows, tokens, kv_heads, dim).transpose(1, 2))
    for cache, old in zip(caches, before, strict=True):  # nothing else written
        kept = torch.ones_like(cache, dtype=torch.bool)
        kept[:rows, :, new] = False
        assert torch.equal(cache[kept], old[kept])
    with pytest.raises(RuntimeError, match="no room"):
        torch.ops.madapt_cpu.rotary_cache(query, key, value, cos, sin, *caches, start + 3)


def test_llama_attention_on_the_rotary_kernel_gives_the_model_s_logits_and_cache_to_the_bit():
    from madapt.serve.kv_cache import growing_cache
    from madapt.serve.native_layers import NativeAttention

    assert native.load()
    model = small_llama()
    config = model.config
    use_onednn(model)
    ids = torch.randint(0, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cache, logits, tokens, attention = growing_cache(config), [], ids, mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            for _ in range(4):  # the prefill, then three decode steps
                out = model(input_ids=tokens, attention_mask=attention, position_ids=positions, cache=cache)
                logits.append(out.logits)
                tokens = out.logits[:, -1:].argmax(-1)
                attention = torch.cat([attention, mask.new_ones(3, 1)], dim=-1)
                positions = positions[:, -1:] + 1
        return logits, [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]

    assert use_native_layers(model) == 2 * 4 + 1  # per layer two norms, the MLP and the attention; the last norm
    attentions = [layer.self_attn for layer in model.model.layers]
    switched = type(attentions[0])
    assert isinstance(attentions[0], NativeAttention) and switched.__name__ == "LlamaAttention"
    for implementation in ("sdpa", KERNEL_ATTENTION):
        use_decode_attention(model, implementation != "sdpa")
        for attention in attentions:  # the other layers stay on their kernels: only the attention differs
            attention.__class__ = switched.__bases__[1]
        expected = run()
        for attention in attentions:
            attention.__class__ = switched
        got = run()
        for want, have in zip(expected[0] + expected[1], got[0] + got[1], strict=True):
            assert torch.equal(have, want)
    use_native_layers(model, on=False)


@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 49152])
def test_the_argmax_kernel_gives_torch_s_argmax_ties_nan_and_infinities_included(vocab):
    from madapt.serve.sampling import greedy

    assert native.load()
    generator = torch.Generator().manual_seed(vocab)
    wide = torch.randn(8, vocab + 3, generator=generator)
    logits = wide[:, :vocab]  # rows a stride apart, as a slice of the model's logits
    logits[1] = -torch.inf
    logits[2, vocab // 2 :] = logits[2].max() + 1  # equal maxima: the first
    logits[3, -1] = torch.nan
    logits[4, vocab // 3] = torch.nan
    logits[4, -1] = torch.inf
    logits[5] = torch.randint(0, 3, (vocab,), generator=generator).float()  # many ties
    logits[6, 0] = torch.inf
    got = torch.ops.madapt_cpu.argmax_rows(logits)
    assert got.dtype == torch.long and torch.equal(got, logits.argmax(-1))
    assert torch.equal(greedy(logits, kernel=True), greedy(logits, kernel=False))
    assert torch.equal(greedy(logits.double(), kernel=True), logits.argmax(-1))  # not fp32: torch's
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.madapt_cpu.argmax_rows(logits.double())
