"""Per-row sampling (`madapt.serve.sampling`): the penalties' maths, top-k/min-p, logprobs equal to the
model's own log-softmax, and a row's settings never changing its neighbour's tokens."""

from __future__ import annotations

import math

import pytest
import torch

from madapt.lora import publish_random
from madapt.models import load_base
from madapt.serve import sampling
from madapt.serve.engine import DecodeBatch, Engine, Row
from madapt.serve.multilora import BASE_SLOT, MultiLora, adapter_matrices
from madapt.store import AdapterStore

PROMPT = "Write a loop in Python"


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    base = load_base(tiny_model)
    publish_random(store, base, "sql", r=4, seed=0, targets=["q_proj", "v_proj"])
    lora = MultiLora(base.model)
    stored = store.open("sql")
    slot = lora.load(adapter_matrices("sql", stored.config, stored.tensors))
    return Engine(lora, base.tokenizer, context_length=512), slot


def prompt_ids(engine: Engine, text: str = PROMPT) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def run(engine: Engine, rows: list[Row], continuous: bool) -> list[Row]:
    if not continuous:
        return engine.generate(rows)
    batch = DecodeBatch(engine)
    batch.admit(rows)
    while batch.rows:
        batch.step()
    return rows


def test_penalty_maths():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -1.0])
    repeated = sampling.RepetitionPenalty([0, 1], 2.0)([1, 3], logits)
    assert repeated.tolist() == [1.0, -4.0, 1.0, 0.25, -1.0]  # seen: 0, 1 (prompt), 1, 3 (output)
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5, -1.0]  # the input is left alone
    out = sampling.OutputPenalty(presence=0.5, frequency=0.25)([2, 2, 4], logits)
    assert out.tolist() == pytest.approx([2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5, -1.0 - 0.5 - 0.25])
    assert sampling.penalties([1], repetition=1.0, presence=0.0, frequency=0.0) == []


def test_top_k_and_min_p_keep_only_what_they_should():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    for seed in range(20):
        row = Row([1], BASE_SLOT, 1, temperature=1.5, seed=seed, top_k=2)
        assert sampling.sample(logits, row) in (0, 1)
        row = Row([1], BASE_SLOT, 1, temperature=1.5, seed=seed, min_p=0.5)  # p(2)/p(0) = e^-2 < 0.5
        assert sampling.sample(logits, row) in (0, 1)
        assert sampling.sample(logits, Row([1], BASE_SLOT, 1, temperature=1.0, seed=seed, top_k=1)) == 0
    seen = {sampling.sample(logits, Row([1], BASE_SLOT, 1, temperature=2.0, seed=s)) for s in range(60)}
    assert seen == {0, 1, 2, 3}  # without them every token can come
    with pytest.raises(ValueError, match="min_p"):
        sampling.sample(logits, Row([1], BASE_SLOT, 1, temperature=1.0, min_p=math.nan))


@pytest.mark.parametrize("continuous", [False, True])
def test_logprobs_are_the_models_log_softmax(engine, continuous):
    engine, slot = engine
    ids = prompt_ids(engine)
    other = prompt_ids(engine, "hi there")
    row, neighbour = run(engine, [Row(ids, slot, 6, logprobs=3, prompt_logprobs=True), Row(other, slot, 4)], continuous)
    assert neighbour.ids == run(engine, [Row(other, slot, 4)], continuous)[0].ids
    assert len(row.token_logprobs) == len(row.ids) == 6
    sequence = torch.tensor([ids + row.ids])
    engine.lora.begin_batch([slot])
    try:
        with torch.inference_mode():
            reference = torch.log_softmax(engine.model(input_ids=sequence).logits[0].float(), dim=-1)
    finally:
        engine.lora.end_batch([slot])
    for k, (token, entry) in enumerate(zip(row.ids, row.token_logprobs, strict=True)):
        expected = reference[len(ids) - 1 + k]
        assert entry.token == token == int(expected.argmax())  # greedy: the top token
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
    assert row.prompt_token_logprobs[0] is None and len(row.prompt_token_logprobs) == len(ids)
    for k, entry in enumerate(row.prompt_token_logprobs[1:], start=1):
        assert entry is not None and entry.token == ids[k]
        assert entry.logprob == pytest.approx(float(reference[k - 1, ids[k]]), abs=1e-4)


def test_penalties_act_per_row_and_never_change_a_greedy_neighbour(engine):
    engine, slot = engine
    ids = prompt_ids(engine, "1 2 3")
    alone = run(engine, [Row(ids, slot, 16)], continuous=True)[0].ids  # the token choice is shared by both batchers
    greedy = Row(ids, slot, 16)
    distinct = Row(ids, slot, 16, processors=sampling.penalties(ids, repetition=5.0, frequency=2.0))
    more = Row(ids, slot, 16, processors=sampling.penalties(ids, presence=2.0))
    fewer = Row(ids, slot, 16, processors=sampling.penalties(ids, presence=-2.0))
    sampled = Row(ids, BASE_SLOT, 16, temperature=1.0, top_k=5, min_p=0.05, seed=1, logprobs=2)
    run(engine, [distinct, greedy, more, sampled, fewer], continuous=True)
    assert greedy.ids == alone
    assert len(set(distinct.ids)) == len(distinct.ids) > len(set(alone))  # no token twice
    assert len(set(more.ids)) > len(set(alone)) > len(set(fewer.ids))  # presence: fewer repeats, or more
