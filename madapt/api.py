"""The Python API, shaped like Ludwig's `LudwigModel`: `Model(config).train(dataset=...)`, `.merge()`,
`.evaluate()`, `.predict()`, and `Model.load(config_or_store)`.

The `madapt` CLI is a thin layer over this class (`madapt train/merge/eval/predict` call these methods),
so a notebook and a shell run the same code. Datasets may be anything sources.py reads: a path or URI,
a Hugging Face dataset name or directory, a pandas DataFrame or a `datasets.Dataset`; one for a config with
a single adapter, or a dict {adapter name: dataset}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from madapt.config import Config, ConfigError, data_problems, load_config, parse_config
from madapt.data import CHAT_COLUMN, DataError, check_columns, format_prompt, prompt_columns
from madapt.errors import UserError
from madapt.sources import DatasetLike, describe, read_source
from madapt.store import AdapterStore, Manifest, StoreError

if TYPE_CHECKING:
    import pandas as pd

    from madapt.evaluate import QualityReport
    from madapt.predict import Predictor

ConfigLike = Config | Mapping[str, Any] | str | os.PathLike[str]
CONFIG_SUFFIXES = (".yaml", ".yml")


def as_config(config: ConfigLike) -> Config:
    """A Config from a Config, a dict (as YAML would parse) or a YAML file. Datasets are not required here:
    they may come with `train(dataset=...)`, as with Ludwig."""
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), "config dict")
    return load_config(config)


class PackFailed(UserError):
    """Adapters of a pack that failed (unreadable data, a non-finite loss) while the others were published."""

    def __init__(self, failures: Mapping[str, str], published: Mapping[str, Manifest]):
        self.failures, self.published = dict(failures), dict(published)
        done = ", ".join(manifest.ref for manifest in published.values()) or "none"
        lines = [f"adapter {name!r} failed in its pack: {why}" for name, why in failures.items()]
        super().__init__("\n".join([*lines, f"published: {done}"]))


class Model:
    """Many adapters on one base model, declared by a Ludwig-style config, with its store."""

    def __init__(self, config: ConfigLike):
        self.config = as_config(config)
        self.store = AdapterStore(self.config.storage.uri)
        self.datasets: dict[str, DatasetLike] = {}
        """The data the last `train` used per adapter: `evaluate()` scores the held-out part of it."""
        self.eval_datasets: dict[str, DatasetLike] = {}
        self._predictor: Predictor | None = None

    @classmethod
    def load(cls, config_or_store: ConfigLike) -> Model:
        """A Model from a config (dict, Config or YAML path), or from an adapter store's URI alone: then the
        base model is the one its adapters were trained on and every stored adapter can predict."""
        if isinstance(config_or_store, Config | Mapping):
            return cls(config_or_store)
        location = os.fspath(config_or_store)
        if Path(location).suffix.lower() in CONFIG_SUFFIXES:
            return cls(location)
        return cls(store_config(location))

    # -- training -------------------------------------------------------------------------------------

    def train(
        self,
        dataset: DatasetLike | Mapping[str, DatasetLike] | None = None,
        *,
        eval_dataset: DatasetLike | Mapping[str, DatasetLike] | None = None,
        adapters: Sequence[str] | None = None,
        parallel: bool = False,
        progress: bool = True,
        pack: bool | None = None,
    ) -> dict[str, Manifest]:
        """Train the declared adapters (or `adapters`) and publish each; returns {adapter: its manifest}.
        `dataset`/`eval_dataset`: one dataset for the one adapter trained, or {adapter: dataset}; adapters
        without one use the config's `dataset`/`eval_dataset`. `pack` (default: the config's
        backend.trainer.pack_adapters): the adapters that can share one run train as one pack (see `pack_plan`);
        if some of them fail, the others are still published and PackFailed names the failures."""
        names = self.adapter_names(adapters)
        datasets = self.per_adapter(dataset, names, "dataset")
        eval_datasets = self.per_adapter(eval_dataset, names, "eval_dataset")
        problems = data_problems(self.config, names, given=list(datasets), given_eval=list(eval_datasets))
        if problems:
            raise ConfigError(problems, "train")
        if self.config.backend.trainer.pack_adapters if pack is None else pack:
            published = self.train_pack(names, datasets, eval_datasets, parallel=parallel, progress=progress)
        else:
            published = self.train_each(names, datasets, eval_datasets, parallel=parallel, progress=progress)
        self.datasets.update(datasets)
        self.eval_datasets.update(eval_datasets)
        self._predictor = None  # new versions: the next predict opens them afresh
        return published

    def pack_plan(self, adapters: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
        """(the adapters that train as one pack, {adapter: why it trains in a run of its own})."""
        from madapt.train.pack import split_packable

        return split_packable(self.config, self.adapter_names(adapters))

    def train_pack(
        self,
        names: list[str],
        datasets: dict[str, DatasetLike],
        eval_datasets: dict[str, DatasetLike],
        *,
        parallel: bool,
        progress: bool,
    ) -> dict[str, Manifest]:
        """The packable adapters as one pack, the others one run each; PackFailed if any adapter failed."""
        packed, alone = self.pack_plan(names)
        solo = list(alone) if len(packed) > 1 else list(names)  # a pack of one is an ordinary run
        published: dict[str, Manifest] = {}
        failures: dict[str, str] = {}
        for pack in self.packs_that_fit(packed) if len(packed) > 1 else []:
            if len(pack) < 2:  # too large to share a pack with any other
                solo += pack
                continue
            if self.config.backend.type == "ray":
                from madapt.train.pack_ray import train_ray_pack as train_packed
            else:
                from madapt.train.local import train_local_pack as train_packed
            outcome = train_packed(
                self.config, pack, self.store, progress=progress, datasets=datasets, eval_datasets=eval_datasets
            )
            published.update(outcome.published)
            failures.update(outcome.failures)
        published.update(self.train_each(solo, datasets, eval_datasets, parallel=parallel, progress=progress))
        if failures:
            raise PackFailed(failures, published)
        return published

    def packs_that_fit(self, packed: list[str]) -> list[list[str]]:
        """`packed` split into packs that fit one worker (madapt.plan's estimate), saying so before training;
        one pack when the worker's memory is unknown (use_gpu without backend.trainer.pack_memory)."""
        from madapt.plan import pack_estimate, split_packs, worker_memory

        memory = worker_memory(self.config)
        if memory is None or not packed:
            return [packed] if packed else []
        packs = split_packs(self.config, packed, memory[0])
        if len(packs) > 1:
            need = pack_estimate(self.config, packed).total / 1e9
            shown = " and ".join(f"[{', '.join(pack)}]" for pack in packs)
            print(
                f"pack too large for {memory[1]} ({memory[0] / 1e9:.1f} GB, needs ~{need:.1f} GB): split into {shown}"
            )
        return packs

    def train_each(
        self,
        names: list[str],
        datasets: dict[str, DatasetLike],
        eval_datasets: dict[str, DatasetLike],
        *,
        parallel: bool,
        progress: bool,
    ) -> dict[str, Manifest]:
        """One run per adapter (side by side with `parallel` on Ray)."""
        if not names:
            return {}
        if self.config.backend.type == "ray":
            from madapt.train.distributed import train_adapters

            manifests = train_adapters(
                self.config,
                names,
                self.store,
                parallel=parallel,
                datasets=datasets,
                eval_datasets=eval_datasets,
                progress=progress,
            )
        else:
            from madapt.train.local import train_local

            manifests = [
                train_local(
                    self.config,
                    name,
                    self.store,
                    progress=progress,
                    dataset=datasets.get(name),
                    eval_dataset=eval_datasets.get(name),
                )
                for name in names
            ]
        return {manifest.name: manifest for manifest in manifests}

    def adapter_names(self, adapters: Sequence[str] | None) -> list[str]:
        declared = list(self.config.named_adapters)
        if isinstance(adapters, str):
            adapters = [adapters]
        names = list(adapters) if adapters else declared
        unknown = [name for name in names if name not in declared]
        if unknown:
            raise ConfigError([f"adapter {name!r} is not declared; declared: {declared}" for name in unknown])
        return names

    def per_adapter(
        self, value: DatasetLike | Mapping[str, DatasetLike] | None, names: list[str], what: str
    ) -> dict[str, DatasetLike]:
        """{adapter: dataset} from one dataset (only when one adapter is trained) or a dict."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            unknown = [name for name in value if name not in self.config.named_adapters]
            if unknown:
                declared = list(self.config.named_adapters)
                raise ConfigError(
                    [f"{what}: adapter {name!r} is not declared; declared: {declared}" for name in unknown]
                )
            return {name: value[name] for name in names if name in value}
        if len(names) != 1:
            raise ConfigError(
                [
                    f"{what}: one dataset for adapters {names}: name the adapter it trains (--adapter NAME, "
                    "or adapters=[NAME]) or give {adapter: dataset} for each"
                ]
            )
        return {names[0]: value}

    def merge(self, *, overwrite: bool = False) -> Manifest:
        """Build the config's merge (`adapters.merge`) from the newest source versions and publish it."""
        from madapt.merge import MergeSpec
        from madapt.merge.actor import run_merge

        if self.config.merge is None:
            raise ConfigError(["adapters.merge: this config declares no merge"])
        manifest = run_merge(self.config.storage.uri, MergeSpec.from_config(self.config.merge), overwrite=overwrite)
        self._predictor = None
        return manifest

    # -- evaluation and prediction ---------------------------------------------------------------------

    def evaluate(
        self,
        dataset: DatasetLike | Mapping[str, DatasetLike] | None = None,
        *,
        max_examples: int | None = None,
        progress: bool = False,
    ) -> QualityReport:
        """Held-out loss of the base, the adapters and the merge (see evaluate.py). Without `dataset`, on
        each adapter's held-out examples (of the data `train` was given, else the config's); with one, on
        all of its rows; with {adapter: dataset}, on each adapter's dataset."""
        from madapt.evaluate import evaluate_config
        from madapt.models import load_base
        from madapt.splits import load_examples_from

        splits = None
        if isinstance(dataset, Mapping):
            self.per_adapter(dataset, list(dataset), "dataset")  # names checked
            given = dict(dataset)
        else:
            given = {} if dataset is None else {describe(dataset): dataset}
        if given:
            splits = {label: load_examples_from(self.config, data)[:max_examples] for label, data in given.items()}
        pairs = None
        if given and self.config.trainer.is_preference:
            from madapt.preference_data import accuracy_pairs, load_preference_examples_from

            read = load_preference_examples_from
            pairs = {label: accuracy_pairs(read(self.config, data))[:max_examples] for label, data in given.items()}
        base = load_base(self.config.base_model, trust_remote_code=self.config.trust_remote_code)
        return evaluate_config(
            self.config,
            base,
            self.store,
            max_examples=max_examples,
            splits=splits,
            datasets=self.datasets,
            eval_datasets=self.eval_datasets,
            progress=progress,
            pairs=pairs,
        )

    def predict(
        self,
        dataset_or_prompts: DatasetLike | Sequence[str],
        adapter: str | Sequence[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        progress: bool = False,
        **generation: Any,
    ) -> pd.DataFrame:
        """Generate with each `adapter` (NAME, NAME@VERSION or 'base'; default: the config's active one) for
        each prompt: a list of prompts, one prompt, or a dataset whose input column holds them, `batch_size`
        prompts per `generate` call (as Ludwig's predict batches). Returns a DataFrame with the input (a
        dataset's every column), the adapter and `<output>_response` (Ludwig's prediction column), one row
        per prompt and adapter."""
        import pandas as pd
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise DataError(f"predict: batch_size must be at least 1, not {batch_size}")
        inputs = self.inputs_of(dataset_or_prompts)
        refs = [adapter] if isinstance(adapter, str) else list(adapter or [self.config.active])
        predictor = self.predictor()
        response = f"{self.config.output_column}_response"
        given_text = not self.is_dataset(dataset_or_prompts)
        source = "predict's prompts (a dataset gives more columns)" if given_text else describe(dataset_or_prompts)
        prompts = self.prompts_of(inputs, source)
        bar = tqdm(total=len(prompts) * len(refs), desc="predict", unit="row", disable=not progress)
        tables = []
        for ref in refs:
            table = inputs.copy()
            table["adapter"] = ref
            answers: list[str] = []
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                answers += predictor.generate_batch(batch, ref, max_new_tokens=max_new_tokens, **generation)
                bar.update(len(batch))
            table[response] = answers
            tables.append(table)
        bar.close()
        return pd.concat(tables, ignore_index=True)

    def inputs_of(self, dataset_or_prompts: DatasetLike | Sequence[str]) -> pd.DataFrame:
        """The rows to predict for: a list of strings or one string that is not a path or URI (the input
        column only), or a dataset with every column (a Hugging Face hub dataset as hf://NAME)."""
        import pandas as pd

        value, column = dataset_or_prompts, self.config.input_column
        if isinstance(value, str) and not self.is_dataset(value):
            return pd.DataFrame({column: [value]})
        if isinstance(value, Sequence) and not isinstance(value, str):
            if not all(isinstance(prompt, str) for prompt in value):
                raise DataError("predict: a list of prompts must hold strings only")
            return pd.DataFrame({column: list(value)})
        table = read_source(value)  # type: ignore[arg-type]  # str, path or in-memory dataset
        if CHAT_COLUMN in table.column_names and column not in table.column_names:
            raise DataError(f"{describe(value)}: chat rows: predict takes prompts, not conversations")
        taken = [name for name in ("adapter", f"{self.config.output_column}_response") if name in table.column_names]
        if taken:
            raise DataError(f"{describe(value)}: columns {taken} would be overwritten by predict's output; rename them")
        return table.to_pandas()

    @staticmethod
    def is_dataset(value: object) -> bool:
        """A string is a prompt unless it is a path that exists or a URI; a list holds prompts."""
        if isinstance(value, str):
            return "://" in value or Path(value).exists()
        return not isinstance(value, Sequence)

    def prompts_of(self, inputs: pd.DataFrame, source: str) -> list[str]:
        """Each row's prompt as training formats it: the template's columns (Ludwig's rule: any dataset
        column) as text. Prompts given as strings fill the input column only, so a template naming other
        columns needs a dataset."""
        column, template, task = self.config.input_column, self.config.prompt.template, self.config.prompt.task
        columns = prompt_columns(input_column=column, template=template, task=task)
        check_columns(source, list(inputs.columns), prompt=columns, output=None)
        rows = inputs[columns].astype(str).to_dict("records")
        return [format_prompt(row, input_column=column, template=template, task=task) for row in rows]

    def predictor(self) -> Predictor:
        """One loaded base for every predict call; adapters are attached on first use."""
        if self._predictor is None:
            from madapt.models import load_base
            from madapt.predict import Predictor

            base = load_base(self.config.base_model, trust_remote_code=self.config.trust_remote_code)
            self._predictor = Predictor(
                base,
                self.store,
                generation=self.config.generation.kwargs(),
            )
        return self._predictor


def store_config(uri: str) -> Config:
    """A config that predicts with every adapter of the store at `uri`, on the base they were trained on."""
    store = AdapterStore(uri)
    manifests = store.list()
    if not manifests:
        raise StoreError(f"{uri}: no adapters in this store (give a config to train some)")
    bases = sorted({m.base_model for m in manifests})
    if len(bases) > 1:
        raise StoreError(f"{uri}: adapters of several base models {bases}; give a config that names one")
    newest = max(manifests, key=lambda m: m.created)
    document = {
        "base_model": bases[0],
        "adapters": {"adapters": {name: {} for name in sorted({m.name for m in manifests})}, "active": newest.name},
        "storage": {"uri": uri},
        "backend": {"type": "local"},
    }
    return parse_config(document, uri)
