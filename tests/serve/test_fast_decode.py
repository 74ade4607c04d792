"""The faster decode step's parts compute what they replace: the growing KV cache the same keys and values
as transformers' concatenation, whatever `DecodeBatch` does to it between steps, and oneDNN's Linears what
`F.linear` does, the same for a row alone as in a batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from madapt.serve.cpu_gemm import OneDnnLinear, use_onednn
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


def test_onednn_linears_compute_f_linear_and_give_a_row_alone_what_it_gets_in_a_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(6, 3, 16)
    with torch.inference_mode():
        expected = model(x)
        assert use_onednn(model) == 2 and all(type(m) is OneDnnLinear for m in (model[0], model[2]))
        got = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(got, expected)
    assert torch.equal(got, alone)
    assert use_onednn(model, on=False) == 2 and type(model[0]) is nn.Linear
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_onednn_linears_leave_autograd_to_f_linear():
    linear = nn.Linear(4, 2)
    use_onednn(linear)
    x = torch.randn(3, 4)
    linear(x).sum().backward()
    assert linear.weight.grad is not None
    torch.testing.assert_close(linear(x), functional.linear(x, linear.weight, linear.bias))
