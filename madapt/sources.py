"""Where training data comes from, as one Arrow table: a file or object-store URI (CSV, JSONL, Parquet), a
Hugging Face `datasets` name or directory, or data already in memory (a pandas DataFrame, a
`datasets.Dataset`, an Arrow table).

Every source is read into a table plus a label that names it in errors ("data.csv", "DataFrame"), so
data.py turns rows into examples the same way whatever the source. `datasets` is imported only for the
sources that need it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pyarrow as pa

from madapt.data import READERS, DataError, read_table

if TYPE_CHECKING:
    import datasets
    import pandas as pd

DatasetLike: TypeAlias = "str | os.PathLike[str] | pa.Table | pd.DataFrame | datasets.Dataset"
"""What `--dataset`, a config's `dataset:` and `Model.train(dataset=...)` accept."""

HUB_PREFIX = "hf://"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
"""`name`, `owner/name`, optionally `:split` (default: train)."""
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write: such a directory is read with load_from_disk."""


def describe(dataset: DatasetLike) -> str:
    """The label a source goes by in messages: its path or name, else its type."""
    if isinstance(dataset, str | os.PathLike):
        return os.fspath(dataset)
    return type(dataset).__name__


def read_source(dataset: DatasetLike, split: str = "train") -> pa.Table:
    """One source as an Arrow table with at least one row; `split` picks a split of a Hugging Face dataset
    that has several (a `:split` suffix on a hub name wins)."""
    if isinstance(dataset, str | os.PathLike):
        table = read_location(os.fspath(dataset), split)
    elif isinstance(dataset, pa.Table):
        table = dataset
    elif type(dataset).__module__.partition(".")[0] == "pandas":
        table = pa.Table.from_pandas(dataset, preserve_index=False)
    elif type(dataset).__module__.partition(".")[0] == "datasets":
        table = hf_table(dataset, split, describe(dataset))
    else:
        raise DataError(
            f"unsupported dataset {type(dataset).__name__}: give a path, a Hugging Face dataset name, "
            "a pandas DataFrame or a datasets.Dataset"
        )
    if table.num_rows == 0:
        raise DataError(f"{describe(dataset)}: dataset is empty")
    return table


def read_location(location: str, split: str) -> pa.Table:
    """A file or URI (by suffix), a local Hugging Face dataset directory, or a hub name."""
    if location.startswith(HUB_PREFIX):
        return hub_table(location.removeprefix(HUB_PREFIX), split, location)
    if "://" in location or Path(location).suffix.lower() in READERS:
        return read_table(location)
    path = Path(location).expanduser()
    if path.is_dir():
        return directory_table(path, split)
    if path.exists():
        return read_table(location)  # a file with an unknown suffix: read_table names the formats
    if HUB_NAME.match(location) and not location.startswith("."):
        return hub_table(location, split, location)
    raise DataError(f"{location}: dataset not found (neither a file, a directory nor a Hugging Face dataset name)")


def directory_table(path: Path, split: str) -> pa.Table:
    """A directory written by `save_to_disk`, or a folder of data files `datasets.load_dataset` reads."""
    datasets = import_datasets(str(path))
    try:
        if any((path / marker).exists() for marker in SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as a Hugging Face dataset directory: {error}") from None
    return hf_table(loaded, split, str(path))


def hub_table(name: str, split: str, label: str) -> pa.Table:
    """A dataset from the Hugging Face hub or its local cache (offline with HF_HUB_OFFLINE=1)."""
    datasets = import_datasets(label)
    name, _, named_split = name.partition(":")
    try:
        loaded = datasets.load_dataset(name, split=named_split or split)
    except ConnectionError as error:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the local cache
        raise DataError(
            f"{label}: Hugging Face dataset {name!r} is not in the local cache and the hub cannot be reached "
            f"({error}); download it once with network access, or pass a local file or a directory written "
            "by Dataset.save_to_disk"
        ) from None
    except (OSError, ValueError) as error:  # no such dataset or split
        raise DataError(f"{label}: cannot load Hugging Face dataset {name!r}: {error}") from None
    return hf_table(loaded, split, label)


def hf_table(loaded: Any, split: str, label: str) -> pa.Table:
    """A `datasets.Dataset` (or one split of a `DatasetDict`) as an Arrow table, in row order."""
    datasets = import_datasets(label)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if split not in loaded and len(splits) != 1:
            raise DataError(f"{label}: no split {split!r}; the dataset has {splits}")
        loaded = loaded[split] if split in loaded else loaded[splits[0]]
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{label}: a {type(loaded).__name__} cannot be read whole; give a datasets.Dataset")
    return loaded.with_format("arrow")[:]


def import_datasets(label: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading Hugging Face datasets needs `pip install datasets`") from None
    return datasets


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a table (e.g. `madapt predict --dataset`'s output) as CSV, JSONL or Parquet by the file's
    suffix, the formats training reads."""
    kind = READERS.get(Path(path).suffix.lower())
    if kind is None:
        raise DataError(f"{os.fspath(path)}: unsupported output format; use .csv, .jsonl or .parquet")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "json":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
