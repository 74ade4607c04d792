"""trainer.type dpo / kto / orpo: Ludwig's keys for each, validated; the keys Ludwig's alignment examples write
but its schema lacks (beta, desirable_weight, undesirable_weight) read as the type's own with a warning line;
grpo refused with its reason; and `Model.train` refusing to fine-tune in their place until the loop runs them."""

from __future__ import annotations

import logging

import pytest

from madapt.config import ConfigError, parse_config


def config_with(trainer: dict) -> dict:
    return {"base_model": "x", "adapter": {}, "dataset": "d.jsonl", "trainer": trainer}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_dpo_takes_ludwigs_keys_with_ludwigs_defaults():
    trainer = parse_config(config_with({"type": "dpo"})).trainer
    assert trainer.is_preference
    assert (trainer.dpo_beta, trainer.dpo_loss_type, trainer.dpo_label_smoothing) == (0.1, "sigmoid", 0.0)
    assert trainer.rejected_column == "rejected"
    set_ = parse_config(
        config_with(
            {"type": "dpo", "dpo_beta": 0.3, "dpo_loss_type": "ipo", "dpo_label_smoothing": 0.2, "rejected_column": "r"}
        )
    ).trainer
    assert (set_.dpo_beta, set_.dpo_loss_type, set_.dpo_label_smoothing, set_.rejected_column) == (0.3, "ipo", 0.2, "r")


def test_kto_and_orpo_take_their_keys():
    kto = parse_config(config_with({"type": "kto", "kto_beta": 0.2, "kto_undesirable_weight": 1.5})).trainer
    assert (kto.kto_beta, kto.kto_desirable_weight, kto.kto_undesirable_weight, kto.kto_label_column) == (
        0.2,
        1.0,
        1.5,
        "label",
    )
    assert parse_config(config_with({"type": "orpo", "orpo_beta": 0.5})).trainer.orpo_beta == 0.5


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"type": "dpo", "kto_beta": 0.1}, "trainer.kto_beta: a key of trainer type kto, not of 'dpo'"),
        ({"type": "orpo", "dpo_beta": 0.1}, "trainer.dpo_beta: a key of trainer type dpo, not of 'orpo'"),
        ({"type": "kto", "orpo_beta": 0.1}, "trainer.orpo_beta: a key of trainer type orpo, not of 'kto'"),
        ({"dpo_loss_type": "ipo"}, "trainer.dpo_loss_type: a key of trainer type dpo, not of 'finetune'"),
        ({"rejected_column": "r"}, "trainer.rejected_column: a key of trainer type dpo / kto / orpo"),
        ({"type": "dpo", "grpo_epsilon": 0.1}, "trainer.grpo_epsilon: a key of trainer type grpo, not of 'dpo'"),
        ({"type": "dpo", "dpo_loss_type": "hinge"}, "trainer.dpo_loss_type: "),
        ({"type": "dpo", "dpo_label_smoothing": 0.6}, "trainer.dpo_label_smoothing: "),
        ({"type": "dpo", "dpo_beta": 0}, "trainer.dpo_beta: "),
        ({"type": "dpo", "beta": 0.2, "dpo_beta": 0.3}, "beta 0.2 and dpo_beta 0.3 disagree: keep dpo_beta"),
        ({"type": "finetune", "beta": 0.2}, "trainer.beta: unknown key"),
        ({"type": "grpo"}, "GRPO needs a reward function and completions generated inside the training loop"),
    ],
)
def test_preference_key_problems(trainer, message):
    found = problems_of(config_with(trainer))
    assert any(message in p for p in found), found


@pytest.mark.parametrize(
    ("trainer", "key", "value"),
    [
        ({"type": "dpo", "beta": 0.25}, "dpo_beta", 0.25),
        ({"type": "dpo", "loss_type": "ipo"}, "dpo_loss_type", "ipo"),
        ({"type": "kto", "beta": 0.25}, "kto_beta", 0.25),
        ({"type": "kto", "desirable_weight": 1.33}, "kto_desirable_weight", 1.33),
        ({"type": "kto", "undesirable_weight": 0.5}, "kto_undesirable_weight", 0.5),
        ({"type": "orpo", "beta": 0.25}, "orpo_beta", 0.25),
    ],
)
def test_ludwig_example_keys_are_read_as_the_types_own_with_a_warning(trainer, key, value, caplog):
    alias = next(k for k in trainer if k != "type")
    with caplog.at_level(logging.WARNING, logger="madapt.config"):
        config = parse_config(config_with(trainer))
    assert getattr(config.trainer, key) == value
    note = config.notes[f"trainer.{alias}"]
    assert f"madapt reads it as trainer.{key}" in note and "Ludwig drops it" in note
    assert f"trainer.{alias}" in caplog.text


def test_kto_notes_that_rejected_column_is_not_read():
    config = parse_config(config_with({"type": "kto", "rejected_column": "no"}))
    assert "not read" in config.notes["trainer.rejected_column"]
