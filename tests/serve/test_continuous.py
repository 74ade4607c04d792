"""Continuous batching: rows joining mid-flight decode exactly as alone, failures and cancellations stay in
their row, adapters gathered per batch and per thread, incremental detokenization equals full decoding."""

from __future__ import annotations

import asyncio
import random
import threading
from types import SimpleNamespace

import pytest
import torch

from madapt.lora import publish_random
from madapt.models import load_base
from madapt.serve import decode_step
from madapt.serve.cpu_gemm import use_onednn
from madapt.serve.decode_attention import KERNEL_ATTENTION, use_decode_attention
from madapt.serve.engine import DecodeBatch, Engine, Row, _detokenize
from madapt.serve.multilora import BASE_SLOT, MultiLora, adapter_matrices, swap_remove
from madapt.serve.native_layers import use_native_layers
from madapt.serve.scheduler import ContinuousBatcher
from madapt.store import AdapterStore
from tests.helpers import decode_joining

SPECS = {"sql": (4, ["q_proj", "v_proj"]), "math": (8, ["q_proj", "k_proj", "v_proj", "o_proj"])}
PROMPTS = ["Write a loop in Python", "hi", "What is the capital of France? Answer briefly", "2+2=", "Once upon"]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    store = AdapterStore(str(tmp_path_factory.mktemp("store")))
    base = load_base(tiny_model)
    for i, (name, (r, targets)) in enumerate(SPECS.items()):
        publish_random(store, base, name, r=r, seed=i, targets=targets)
    lora = MultiLora(base.model)
    slots = {n: lora.load(adapter_matrices(n, s.config, s.tensors)) for n in SPECS for s in [store.open(n)]}
    slots["base"] = BASE_SLOT
    return Engine(lora, base.tokenizer, context_length=512), slots


def row(engine: Engine, slots: dict[str, int], prompt: str, adapter: str, max_tokens: int, **settings) -> Row:
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    return Row(prompt_ids=ids, slot=slots[adapter], max_tokens=max_tokens, **settings)


def alone(engine: Engine, r: Row) -> Row:
    copy = Row(r.prompt_ids, r.slot, r.max_tokens, r.temperature, r.top_p, list(r.stop), r.seed)
    return engine.generate([copy])[0]


def drain(batch: DecodeBatch, limit: int = 200) -> None:
    for _ in range(limit):
        if not batch.rows:
            return
        batch.step()
    raise AssertionError("the batch did not end")


def use_kernels(engine: Engine, on: bool) -> None:
    """madapt's C++ kernels (attention, adapters' products, RMSNorm, SiLU) on or off, as `native_kernels`."""
    attention = use_decode_attention(engine.model, kernel=on)
    engine.lora.kernel = on
    use_native_layers(engine.model, on)
    assert (attention == KERNEL_ATTENTION) is on


@pytest.mark.parametrize(
    ("onednn", "kernels"), [(True, True), (True, False), (False, False)], ids=["onednn-kernels", "onednn", "mkl"]
)
def test_rows_joining_mid_flight_decode_as_alone(served, onednn, kernels, monkeypatch):
    engine, slots = served
    flat_steps = []  # the steps the flat loop ran (madapt.serve.decode_step): with oneDNN and the kernels, all

    def decode_logits(*args: object) -> torch.Tensor | None:
        flat_steps.append(decode_step.decode_logits(*args))  # type: ignore[arg-type]
        return flat_steps[-1]

    monkeypatch.setattr("madapt.serve.engine.decode_step", SimpleNamespace(decode_logits=decode_logits))
    use_onednn(engine.model, onednn)  # the base's Linears on either GEMM (madapt.serve.cpu_gemm)
    use_kernels(engine, kernels)  # every path of the step: mixed ranks (4, 8), base rows, rows joining
    plan = [  # (decode steps before it joins, prompt, adapter, max_tokens)
        (0, PROMPTS[0], "sql", 6),
        (0, PROMPTS[1], "base", 14),
        (3, PROMPTS[2], "math", 9),
        (5, PROMPTS[3], "sql", 3),
        (5, PROMPTS[4], "math", 12),
        (8, PROMPTS[2] * 3, "base", 5),  # the longest prompt joins last: the running rows are re-padded
    ]
    rows = [row(engine, slots, p, a, n) for _, p, a, n in plan]
    rows.append(row(engine, slots, PROMPTS[4], "sql", 10, temperature=0.8, top_p=0.9, seed=5))
    plan.append((4, "", "", 0))
    expected = [alone(engine, r) for r in rows]

    ended: list[Row] = []
    for r in rows:
        r.on_end = ended.append
    batch = decode_joining(engine, rows, [at for at, *_ in plan], 40)
    drain(batch)

    assert [r.ids for r in rows] == [e.ids for e in expected]
    assert [r.text for r in rows] == [e.text for e in expected]
    assert [r.finish_reason for r in rows] == [e.finish_reason for e in expected]
    assert sorted(map(id, ended)) == sorted(map(id, rows))  # each told once that it ended
    assert len({tuple(r.ids) for r in rows}) > 3
    assert engine.lora.pins == {}  # every row's adapter slot unpinned as it left
    assert flat_steps and all((logits is not None) is (onednn and kernels) for logits in flat_steps)
    use_onednn(engine.model)
    use_kernels(engine, True)


def test_one_failing_row_ends_alone_the_others_go_on(served):
    engine, slots = served
    good = row(engine, slots, PROMPTS[0], "sql", 8)
    sampled = row(engine, slots, PROMPTS[1], "math", 8, temperature=1.0, top_p=0.9, seed=3)
    bad = row(engine, slots, PROMPTS[2], "sql", 8, temperature=1.0, top_p=float("nan"))  # sampling raises
    expected = [alone(engine, good), alone(engine, sampled)]
    for run in ("continuous", "static"):
        rows = [
            Row(r.prompt_ids, r.slot, r.max_tokens, r.temperature, r.top_p, [], r.seed) for r in (good, bad, sampled)
        ]
        if run == "continuous":
            batch = DecodeBatch(engine)
            batch.admit(rows)
            drain(batch)
        else:
            engine.generate(rows)
        assert rows[1].finish_reason == "error" and "ValueError" in (rows[1].error or "")
        assert [rows[0].ids, rows[2].ids] == [e.ids for e in expected], run
        assert rows[0].error is None and rows[2].error is None

    def explode(text: str) -> None:
        raise RuntimeError("the client's queue is gone")

    noisy = row(engine, slots, PROMPTS[0], "sql", 8, on_text=explode)
    quiet = row(engine, slots, PROMPTS[0], "sql", 8)
    batch = DecodeBatch(engine)
    batch.admit([noisy, quiet])
    drain(batch)
    assert noisy.finish_reason == "error" and quiet.ids == expected[0].ids


def test_a_cancelled_row_stops_taking_decode_steps(served):
    engine, slots = served
    keep = row(engine, slots, PROMPTS[0], "sql", 30)
    leave = row(engine, slots, PROMPTS[1], "math", 30)
    batch = DecodeBatch(engine)
    batch.admit([keep, leave])
    for _ in range(3):
        batch.step()
    leave.cancelled = True  # what closing its stream does
    drain(batch)
    assert leave.steps == 4 and leave.finish_reason == "cancelled"  # prefill + 3 steps, nothing after
    assert keep.ids == alone(engine, keep).ids and keep.steps == len(keep.ids)
    assert batch.steps == 29  # the decode steps of the row that stayed

    waiting = row(engine, slots, PROMPTS[1], "sql", 5, cancelled=True)
    batch.admit([waiting])  # cancelled before it started: computes nothing
    assert waiting.steps == 0 and waiting.finish_reason == "cancelled" and not batch.rows


def test_a_new_request_runs_beside_a_long_one_and_closing_a_stream_cancels_its_row(served):
    engine, slots = served
    batcher = ContinuousBatcher(engine, max_size=8, step_tokens=256)
    long = row(engine, slots, PROMPTS[0], "sql", 400)
    short = row(engine, slots, PROMPTS[1], "math", 6)

    async def main() -> tuple[list[tuple[str, object]], int]:
        stream = batcher.submit(long)
        await stream.__anext__()  # the first text: the long row is running
        events = [e async for e in batcher.submit(short)]  # joins the running batch, ends first
        running = len(long.ids)
        await stream.aclose()  # the client went away
        for _ in range(500):
            if not batcher.batch.rows:
                break
            await asyncio.sleep(0.01)
        return events, running

    try:
        events, running = asyncio.run(main())
    finally:
        batcher.stop()
    assert events[-1] == ("done", None) and "".join(v for k, v in events if k == "text") == short.text
    assert short.ids == alone(engine, short).ids and running < 400  # it did not wait for the long row
    assert long.finish_reason == "cancelled" and long.steps < 150  # it would have taken 400
    assert not batcher.batch.rows and batcher.largest == 2


def test_admission_within_the_step_token_budget(served):
    engine, _ = served
    batcher = ContinuousBatcher(engine, max_size=3, step_tokens=10)
    rows = [Row(prompt_ids=[1] * n, slot=BASE_SLOT, max_tokens=1) for n in (12, 4, 5, 3, 1)]
    batcher.waiting.extend(rows)
    assert batcher._take() == rows[:1]  # over the budget alone: still admitted, alone
    assert batcher._take() == rows[1:3]  # 4 + 5 <= 10
    assert batcher._take() == rows[3:5]


def test_swap_remove_moves_only_the_rows_that_must_move():
    assert swap_remove(5, [1, 3]) == ([1], [4], 3)
    assert swap_remove(4, [0, 3]) == ([0], [2], 2)
    assert swap_remove(3, [0, 1, 2]) == ([], [], 0)
    assert swap_remove(4, [2, 3]) == ([], [], 2)


def test_batches_on_two_threads_keep_their_own_adapters(served):
    engine, slots = served
    lora, model = engine.lora, engine.model
    ids = engine.tokenizer(["the quick brown fox"], return_tensors="pt").input_ids

    def logits(slot: int) -> torch.Tensor:
        lora.begin_batch([slot])
        try:
            with torch.inference_mode():
                return model(input_ids=ids).logits
        finally:
            lora.end_batch([slot])

    expected = {name: logits(slots[name]) for name in ("sql", "math")}
    lora.begin_batch([slots["sql"]])
    try:
        with pytest.raises(RuntimeError, match="already"):
            lora.begin_batch([slots["math"]])  # would have overwritten the running batch's rows
        results: dict[str, torch.Tensor] = {}
        thread = threading.Thread(target=lambda: results.setdefault("math", logits(slots["math"])))
        thread.start()
        thread.join()
        with torch.inference_mode():
            results["sql"] = model(input_ids=ids).logits  # this thread's batch is untouched
    finally:
        lora.end_batch([slots["sql"]])
    torch.testing.assert_close(results["math"], expected["math"], atol=0, rtol=0)
    torch.testing.assert_close(results["sql"], expected["sql"], atol=0, rtol=0)
    assert (expected["sql"] - expected["math"]).abs().max() > 1e-3


def test_incremental_detokenization_equals_full_decoding(served):
    engine, _ = served
    tokenizer = engine.tokenizer
    texts = ["héllo 日本語 🙂 ok", "naïve café — «quoted» ∑ 🤖🤖 end", "plain ascii text, with punctuation."]
    sequences = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    chance = random.Random(0)
    sequences += [[chance.randrange(len(tokenizer)) for _ in range(40)] for _ in range(30)]  # byte fragments too
    multi_byte = 0
    for ids in sequences:
        r = Row(prompt_ids=[1], slot=BASE_SLOT, max_tokens=len(ids))
        pieces = []
        for i, token in enumerate(ids):
            r.ids.append(token)
            pieces.append(_detokenize(tokenizer, r, final=i == len(ids) - 1))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == full
        multi_byte += any(tokenizer.decode([t]).endswith("\ufffd") for t in ids)
    assert multi_byte > 2  # the sequences did split characters across tokens


def test_streamed_text_equals_full_decoding_with_stop_strings(served):
    engine, _ = served
    ids = engine.tokenizer("café 日本語 says hello world 🙂 and more", add_special_tokens=False).input_ids
    streamed: list[str] = []
    r = Row(prompt_ids=[1], slot=BASE_SLOT, max_tokens=len(ids), stop=["world 🙂"], on_text=streamed.append)
    for token in ids:
        engine._advance(r, token)
        assert "".join(streamed) == r.text[: r.emitted]
        if r.finish_reason:
            break
    assert r.finish_reason == "stop" and r.text == "café 日本語 says hello "
    assert "".join(streamed) == r.text
