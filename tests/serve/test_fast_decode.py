"""The faster decode step's parts compute what they replace: the growing KV cache the same keys and values
as transformers' concatenation, whatever `DecodeBatch` does to it between steps, and oneDNN's Linears what
`F.linear` does, the same for a row alone as in a batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from madapt.serve.cpu_gemm import OneDnnLinear, PackedOneDnnLinear, use_onednn
from madapt.serve.decode_attention import ATTENTION, decode_attention_forward, use_decode_attention
from madapt.serve.kv_cache import HEADROOM, GrowingLayer


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


def test_a_model_switches_to_decode_attention_and_back_and_greedy_tokens_stay(base):
    ids = base.tokenizer("def add(a, b):", return_tensors="pt").input_ids
    before = base.model.config._attn_implementation == ATTENTION
    with torch.inference_mode():
        assert use_decode_attention(base.model) and base.model.config._attn_implementation == ATTENTION
        fast = base.model.generate(ids, max_new_tokens=12, do_sample=False)
        assert not use_decode_attention(base.model, on=False)
        assert base.model.config._attn_implementation == "sdpa"
        sdpa = base.model.generate(ids, max_new_tokens=12, do_sample=False)
    use_decode_attention(base.model, before)
    assert torch.equal(fast, sdpa)
