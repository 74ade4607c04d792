"""Packed training in one process (`backend: local`): each adapter of a pack is published with the tensors it
gets alone, whatever else is in the pack (different ranks and target modules); a failing adapter fails alone."""

from __future__ import annotations

import pytest
import torch

from madapt.api import Model, PackFailed
from madapt.config import parse_config
from madapt.models import load_base
from madapt.store import AdapterStore
from madapt.train.loop import Trainer, micro_batches
from madapt.train.pack import AdapterView, Lane, PackTrainer, add_pack, row_groups, split_packable
from madapt.train.settings import settings_for
from tests.helpers import tiny_config

JOINED = 64
"""pack_max_rows of the pack tests: every lane's rows in one forward, so rows of different adapters share it."""


def pack_document(tiny_model: str, store_uri: str, **trainer) -> dict:
    """Two adapters that differ in rank and target modules, no dropout (so alone and packed are comparable)."""
    document = tiny_config(tiny_model, store_uri)
    adapters = document["adapters"]["adapters"]
    adapters["coding"].update(dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters["chat"].update(dropout=0.0, target_modules=["q_proj", "k_proj", "o_proj"])
    document["trainer"].update(batch_size=4, max_steps=4, **trainer)
    document["backend"] = {"type": "local", "trainer": {"pack_max_rows": JOINED}}
    return document


def pack_config(tiny_model: str, store_uri: str, **trainer):
    return parse_config(pack_document(tiny_model, store_uri, **trainer))


def assert_same_tensors(alone: dict[str, torch.Tensor], packed: dict[str, torch.Tensor]) -> None:
    assert alone.keys() == packed.keys()
    for key, tensor in alone.items():
        scale = tensor.abs().max().item()
        torch.testing.assert_close(packed[key], tensor, rtol=1e-4, atol=1e-4 * scale, msg=key)


def test_each_adapter_of_a_pack_is_published_as_it_trains_alone(tiny_model, tmp_path):
    config = pack_config(tiny_model, str(tmp_path / "alone"))
    Model(config).train(progress=False)
    packed_store = AdapterStore(str(tmp_path / "packed"))
    packed = Model(config.model_copy(update={"storage": config.storage.model_copy(update={"uri": packed_store.uri})}))
    manifests = packed.train(progress=False, pack=True)
    alone_store = AdapterStore(str(tmp_path / "alone"))
    for name in ("coding", "chat"):
        assert manifests[name].metrics["pack"] == ["coding", "chat"]
        assert manifests[name].metrics["steps"] == 4
        assert_same_tensors(alone_store.open(name).tensors, packed_store.open(name).tensors)
        assert manifests[name].metrics["losses"] == pytest.approx(
            alone_store.open(name).manifest.metrics["losses"], rel=1e-5
        )


def test_an_unreadable_dataset_fails_only_its_adapter(tiny_model, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\nnot json at all\n')
    config = pack_config(tiny_model, str(tmp_path / "store"))
    model = Model(config)
    with pytest.raises(PackFailed) as failed:
        model.train(progress=False, pack=True, dataset={"chat": str(broken)})
    assert list(failed.value.failures) == ["chat"]
    assert "broken.jsonl" in str(failed.value)
    assert list(failed.value.published) == ["coding"]
    assert model.store.open("coding").manifest.metrics["steps"] == 4


def test_a_lane_whose_loss_turns_nan_leaves_and_the_others_finish(tiny_model):
    config = pack_config(tiny_model, "unused")
    base = load_base(tiny_model)
    adapters = {name: config.named_adapters[name] for name in ("coding", "chat")}
    model, router = add_pack(base.model, adapters, 0, quantized=False, gradient_checkpointing=False)
    rows = [{"input_ids": [1, 5, 9, 4 + i % 7, 2], "labels": [-100, 5, 9, 4 + i % 7, 2]} for i in range(16)]
    settings = settings_for(config.trainer, len(rows))
    lanes = [
        Lane(name, Trainer(AdapterView(model, router, name), settings), micro_batches(rows, 4, 0, settings.seed))
        for name in adapters
    ]

    def poison_chat(lane: Lane, report) -> None:
        if lane.name == "chat" and report.step == 2:
            with torch.no_grad():
                for parameter in lane.trainer.model.parameters():
                    parameter.fill_(float("nan"))

    PackTrainer(model, router, lanes, 0).run(poison_chat)
    coding, chat = lanes
    assert chat.failure is not None and "step 3" in chat.failure and chat.trainer.step == 2
    assert coding.failure is None and coding.trainer.step == settings.total_steps
    assert all(torch.isfinite(p).all() for p in coding.trainer.model.parameters())


def test_adapters_that_cannot_share_a_pack_say_why(tiny_model, tmp_path):
    document = tiny_config(tiny_model, str(tmp_path))
    document["adapters"]["adapters"]["chat"]["use_dora"] = True
    packed, alone = split_packable(parse_config(document), ["coding", "chat"])
    assert packed == ["coding"]
    assert "DoRA" in alone["chat"]


@pytest.mark.slow
def test_an_ensembles_members_train_as_lanes_of_the_pack(tiny_model, tmp_path):
    alone_store, packed_store = AdapterStore(str(tmp_path / "alone")), AdapterStore(str(tmp_path / "packed"))
    document = tiny_config(tiny_model, alone_store.uri)
    coding = document["adapters"]["adapters"]["coding"]
    coding.update(dropout=0.0, ensemble={"members": 2})
    document["adapters"]["adapters"]["chat"]["dropout"] = 0.0
    document["trainer"].update(batch_size=4, max_steps=2)
    Model(parse_config(document)).train(progress=False)
    document["storage"]["uri"] = packed_store.uri
    manifests = Model(parse_config(document)).train(progress=False, pack=True)
    assert [s["name"] for s in manifests["coding"].lineage["sources"]] == ["coding-m1", "coding-m2"]
    for name in ("coding-m1", "coding-m2", "chat"):
        assert packed_store.open(name).manifest.metrics["pack"] == ["coding-m1", "coding-m2", "chat"]
        assert_same_tensors(alone_store.open(name).tensors, packed_store.open(name).tensors)
    assert_same_tensors(alone_store.open("coding").tensors, packed_store.open("coding").tensors)


@pytest.mark.slow
def test_a_qlora_pack_shares_one_4bit_base_and_matches_alone(tiny_model, tmp_path):
    alone_store, packed_store = AdapterStore(str(tmp_path / "alone")), AdapterStore(str(tmp_path / "packed"))
    document = tiny_config(tiny_model, alone_store.uri, quantization={"bits": 4})
    for adapter in document["adapters"]["adapters"].values():
        adapter["dropout"] = 0.0
    document["trainer"].update(batch_size=4, max_steps=3)
    Model(parse_config(document)).train(progress=False)
    document["storage"]["uri"] = packed_store.uri
    Model(parse_config(document)).train(progress=False, pack=True)
    for name in ("coding", "chat"):
        assert_same_tensors(alone_store.open(name).tensors, packed_store.open(name).tensors)


def test_a_row_cap_forwards_lanes_in_groups_with_the_same_gradients(tiny_model):
    config = pack_config(tiny_model, "unused")
    base = load_base(tiny_model)
    adapters = {name: config.named_adapters[name] for name in ("coding", "chat")}
    model, router = add_pack(base.model, adapters, 0, quantized=False, gradient_checkpointing=False)
    rows = [
        {"input_ids": [1, 5, 9, 4 + i % 7, 2][: 3 + i % 3], "labels": [-100, 5, 9, 4 + i % 7, 2][: 3 + i % 3]}
        for i in range(8)
    ]
    settings = settings_for(config.trainer, len(rows))
    assert row_groups([4, 4, 4], 8) == [[0, 1], [2]] and row_groups([4, 9], 8) == [[0], [1]]

    def gradients(max_rows: int) -> tuple[list[tuple[float, int]], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        lanes = [Lane(n, Trainer(AdapterView(model, router, n), settings), iter([])) for n in adapters]
        parts = [next(micro_batches(rows[i * 4 :], 4, 0, settings.seed)) for i in range(2)]
        outcome = PackTrainer(model, router, lanes, 0, max_rows=max_rows).micro_step(lanes, parts, 1)
        return outcome, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    joined, grouped = gradients(8), gradients(4)
    assert [count for _, count in joined[0]] == [count for _, count in grouped[0]]
    assert [loss for loss, _ in joined[0]] == pytest.approx([loss for loss, _ in grouped[0]], rel=1e-5)
    for a, b in zip(joined[1], grouped[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
