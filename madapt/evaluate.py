"""Did the merge keep what each source could do? Held-out loss of the base, every source and the merge on
every source's eval split, as a table, a JSON file and a bar chart next to the merged adapter's report; for
preference-tuned adapters (trainer.type dpo/kto/orpo) also their held-out preference accuracy.

Each model is scored on the same tokens (prompt masked, as in training), so a merge that kept a source's
skill scores close to that source on its split and well below the base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from madapt.charts import pyplot
from madapt.config import Config, ConfigError, madapt_home
from madapt.data import IGNORE_INDEX, Example, collate, tokenize_example
from madapt.lora import attach
from madapt.models import LoadedBase
from madapt.preference import pair_wins
from madapt.preference_data import PreferenceExample, accuracy_pairs, collate_pairs, tokenize_pair
from madapt.sources import DatasetLike
from madapt.store import AdapterStore, StoreError

BASE_LABEL = "base"


@dataclass
class QualityReport:
    """losses[model][split]: mean token loss; `models` in display order (base, sources, merge);
    accuracies[model][split]: held-out preference accuracy, for preference-tuned adapters only."""

    title: str
    models: list[str]
    splits: list[str]
    tokens: dict[str, int]
    losses: dict[str, dict[str, float]]
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)

    def perplexity(self, model: str, split: str) -> float:
        return math.exp(self.losses[model][split])


@torch.no_grad()  # not inference_mode: training (FSDP's unsharded parameters) goes on after a mid-run eval
def heldout_loss(
    model: torch.nn.Module,
    rows: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    batch_size: int = 8,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] = lambda: None,
):
    """(mean loss per predicted token, number of tokens) over tokenised rows, summed exactly across batches;
    `progress` is called after each batch."""
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        tokens += int((labels != IGNORE_INDEX).sum())
        progress()
    return (total / tokens if tokens else math.nan), tokens


@torch.no_grad()
def preference_accuracy(
    model: torch.nn.Module, pairs: Sequence[dict[str, dict[str, list[int]]]], pad_token_id: int, batch_size: int
) -> float:
    """The share of tokenised pairs whose chosen completion the model gives the higher mean log-probability."""
    wins = sum(
        pair_wins(model, collate_pairs(pairs[start : start + batch_size], pad_token_id))
        for start in range(0, len(pairs), batch_size)
    )
    return wins / len(pairs) if pairs else math.nan


def evaluate(
    base: LoadedBase,
    store: AdapterStore,
    adapters: Sequence[str],
    splits: Mapping[str, Sequence[Example]],
    *,
    title: str,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    pairs: Mapping[str, Sequence[PreferenceExample]] | None = None,
) -> QualityReport:
    """Score the base and each adapter ref (NAME or NAME@VERSION) on every split, and on each split's
    preference `pairs` when given; `progress` shows a bar over the batches scored."""
    from tqdm.auto import tqdm

    rows = {name: [tokenize_example(base.tokenizer, e, max_length) for e in split] for name, split in splits.items()}
    pair_rows = {
        name: [tokenize_pair(base.tokenizer, pair, max_length) for pair in split]
        for name, split in (pairs or {}).items()
    }
    accuracies: dict[str, dict[str, float]] = {}
    batches = sum(math.ceil(len(split_rows) / batch_size) for split_rows in rows.values())
    bar = tqdm(total=batches * (1 + len(adapters)), desc="eval", unit="batch", disable=not progress)
    opened = [store.open(ref, expected_fingerprint=base.fingerprint) for ref in adapters]  # all verified up front
    losses: dict[str, dict[str, float]] = {}
    tokens: dict[str, int] = {}
    base.model.eval()
    for index, (label, adapter) in enumerate(zip([BASE_LABEL, *adapters], [None, *opened], strict=True)):
        # One adapter at a time on the bare base: sources of different types cannot share one PEFT model.
        model = base.model if adapter is None else attach(base.model, adapter, f"eval{index}")
        losses[label] = {}
        for split, split_rows in rows.items():
            losses[label][split], tokens[split] = heldout_loss(
                model, split_rows, base.tokenizer.pad_token_id, batch_size, progress=lambda: bar.update(1)
            )
        if pair_rows:
            pad = base.tokenizer.pad_token_id
            accuracies[label] = {s: preference_accuracy(model, p, pad, batch_size) for s, p in pair_rows.items()}
        if adapter is not None:
            model.unload()  # the caller's base back, without adapter layers
    bar.close()
    return QualityReport(title, [BASE_LABEL, *adapters], list(rows), tokens, losses, accuracies)


def eval_splits(
    config: Config,
    names: Sequence[str],
    max_examples: int | None = None,
    *,
    datasets: Mapping[str, DatasetLike] | None = None,
    eval_datasets: Mapping[str, DatasetLike] | None = None,
) -> dict[str, list[Example]]:
    """Each adapter's held-out examples (its eval dataset, else the deterministic carve-out of its dataset);
    `datasets`/`eval_datasets` per adapter replace the config's, as in training."""
    from madapt.splits import load_splits

    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    splits = {}
    for name in names:
        held_out = load_splits(config, name, datasets.get(name), eval_datasets.get(name))[1][:max_examples]
        if not held_out:
            raise ConfigError(
                [f"adapters.adapters.{name}: no held-out examples; set eval_dataset or trainer.eval_fraction > 0"]
            )
        splits[name] = held_out
    return splits


def evaluate_config(
    config: Config,
    base: LoadedBase,
    store: AdapterStore,
    *,
    max_examples: int | None = None,
    splits: Mapping[str, Sequence[Example]] | None = None,
    datasets: Mapping[str, DatasetLike] | None = None,
    eval_datasets: Mapping[str, DatasetLike] | None = None,
    progress: bool = False,
    pairs: Mapping[str, Sequence[PreferenceExample]] | None = None,
) -> QualityReport:
    """The config's quality report: its merge against the exact source versions it was built from, or,
    without a merge, every declared adapter (an ensemble as each of its members, then their merge).
    Scored on `splits` when given, else on each source's held-out examples (see `eval_splits`); a
    preference-tuned config is also scored on its held-out pairs (`pairs`, else `eval_pairs`)."""
    if config.merge is None:
        names = list(config.named_adapters)
        refs = [ref for n in names for ref in (*ensemble_members(config, store, n), store.manifest(n).ref)]
        title = "+".join(store.manifest(n).ref for n in names)
    else:
        merged = store.manifest(config.merge.name)
        if merged.lineage is None:
            raise StoreError(f"{merged.ref} is in the store but is not a merge (no lineage); nothing to compare")
        names = [s["name"] for s in merged.lineage["sources"]]
        refs = [f"{s['name']}@{s['version']}" for s in merged.lineage["sources"]] + [merged.ref]
        title = merged.ref
    if splits is None:
        splits = eval_splits(config, names, max_examples, datasets=datasets, eval_datasets=eval_datasets)
        if config.trainer.is_preference:
            pairs = eval_pairs(config, names, max_examples, datasets=datasets, eval_datasets=eval_datasets)
    return evaluate(
        base,
        store,
        refs,
        splits,
        title=title,
        max_length=config.trainer.max_length,
        batch_size=config.trainer.held_out_batch_size,
        progress=progress,
        pairs=pairs,
    )


def eval_pairs(
    config: Config,
    names: Sequence[str],
    max_examples: int | None = None,
    *,
    datasets: Mapping[str, DatasetLike] | None = None,
    eval_datasets: Mapping[str, DatasetLike] | None = None,
) -> dict[str, list[PreferenceExample]]:
    """Each preference-tuned adapter's held-out pairs (prompts it did not see; for KTO, each held-out
    prompt's desirable and undesirable completion), as training split them."""
    from madapt.splits import load_preference_splits

    datasets, eval_datasets = datasets or {}, eval_datasets or {}
    return {
        name: accuracy_pairs(load_preference_splits(config, name, datasets.get(name), eval_datasets.get(name))[1])[
            :max_examples
        ]
        for name in names
    }


def ensemble_members(config: Config, store: AdapterStore, name: str) -> list[str]:
    """The exact member versions the latest `name` was merged from, when `name` declares an ensemble."""
    if config.named_adapters[name].ensemble is None:
        return []
    merged = store.manifest(name)
    if merged.lineage is None:
        raise StoreError(f"{merged.ref} declares an ensemble but is not a merge (no lineage); retrain it")
    return [f"{s['name']}@{s['version']}" for s in merged.lineage["sources"]]


def format_table(report: QualityReport) -> str:
    """Rows: models; columns: loss and perplexity on each split (lower is better)."""
    width = max(len(m) for m in report.models) + 2
    header = f"{'model':<{width}}" + "".join(f"{f'{s} loss':>16}{'ppl':>10}" for s in report.splits)
    lines = [f"held-out quality of {report.title} (tokens: {report.tokens})", header, "-" * len(header)]
    if report.accuracies:
        header += "".join(f"{f'{s} pref acc':>18}" for s in report.splits)
        lines[1:] = [header, "-" * len(header)]
    for model in report.models:
        cells = "".join(f"{report.losses[model][s]:>16.4f}{report.perplexity(model, s):>10.2f}" for s in report.splits)
        if report.accuracies:
            cells += "".join(f"{report.accuracies[model].get(s, math.nan):>18.3f}" for s in report.splits)
        lines.append(f"{model:<{width}}{cells}")
    return "\n".join(lines)


def report_dir(title: str) -> Path:
    return madapt_home() / "reports" / title


def write_report(report: QualityReport, directory: Path | None = None) -> tuple[Path, Path | None]:
    """Write quality.json and quality.png (grouped bars: one group per split, one bar per model); the PNG
    path is None when matplotlib (madapt[plots]) is not installed."""
    directory = directory or report_dir(report.title)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "quality.json", directory / "quality.png"
    json_path.write_text(json.dumps(asdict(report), indent=2))
    plt = pyplot(png_path)
    if plt is None:
        return json_path, None

    figure, axes = plt.subplots(figsize=(4 + 0.6 * len(report.splits) * len(report.models), 4))
    width = 0.8 / len(report.models)
    for i, model in enumerate(report.models):
        xs = [j + (i - (len(report.models) - 1) / 2) * width for j in range(len(report.splits))]
        bars = axes.bar(xs, [report.losses[model][s] for s in report.splits], width, label=model)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.set_xticks(range(len(report.splits)), [f"{s} eval split" for s in report.splits])
    axes.set_ylabel("held-out loss (lower is better)")
    axes.set_title(f"{report.title}: base vs sources vs merge")
    axes.set_ylim(top=axes.get_ylim()[1] * 1.08)  # room for the bar labels
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return json_path, png_path
