"""An adapter's data as training reads it: its source (the command's, else the config's), rows turned into
examples with the config's columns and prompt, and the held-out split. The local trainer, the Ray driver,
`madapt eval` and `madapt validate --dataset` read data through here, so they read it the same way."""

from __future__ import annotations

from collections.abc import Callable

from madapt.config import Config, ConfigError, data_problems
from madapt.data import Example, Row, examples_from_table, split_examples
from madapt.preference_data import KtoExample, PreferenceExample, load_preference_examples_from
from madapt.sources import DatasetLike, describe, read_source


def load_examples_from(config: Config, dataset: DatasetLike) -> list[Example]:
    """Any dataset source as examples, formatted with the config's columns and prompt."""
    return examples_from_table(
        read_source(dataset),
        source=describe(dataset),
        input_column=config.input_column,
        output_column=config.output_column,
        template=config.prompt.template,
        task=config.prompt.task,
    )


def load_splits(
    config: Config, name: str, dataset: DatasetLike | None = None, eval_dataset: DatasetLike | None = None
) -> tuple[list[Example], list[Example]]:
    """The adapter's training and held-out examples: `dataset`/`eval_dataset` when given (`--dataset`,
    `Model.train(dataset=...)`), else the config's; without an eval dataset, a deterministic carve-out."""
    return read_splits(config, name, dataset, eval_dataset, load_examples_from)


def load_preference_splits(
    config: Config, name: str, dataset: DatasetLike | None = None, eval_dataset: DatasetLike | None = None
) -> tuple[list[PreferenceExample | KtoExample], list[PreferenceExample | KtoExample]]:
    """`load_splits` for a preference trainer (trainer.type dpo/kto/orpo): pairs or labelled rows; the
    carve-out goes by prompt, so held-out pairs are prompts the adapter did not see."""
    return read_splits(config, name, dataset, eval_dataset, load_preference_examples_from)


def read_splits(
    config: Config,
    name: str,
    dataset: DatasetLike | None,
    eval_dataset: DatasetLike | None,
    read: Callable[[Config, DatasetLike], list[Row]],
) -> tuple[list[Row], list[Row]]:
    if dataset is None:
        dataset = config.dataset_for(name)
    if dataset is None:  # the rule training checks up front (data_problems), for callers that skip it
        raise ConfigError(data_problems(config, [name]))
    examples = read(config, dataset)
    if eval_dataset is None:
        eval_dataset = config.named_adapters[name].eval_dataset
    if eval_dataset is not None:
        return examples, read(config, eval_dataset)
    return split_examples(examples, config.trainer.eval_fraction)
