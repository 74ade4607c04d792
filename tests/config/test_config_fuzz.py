"""Hypothesis: no document makes the config loader fail with anything but ConfigError."""

from __future__ import annotations

import contextlib
import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madapt.config import ConfigError, load_config, parse_config
from tests.helpers import ludwig_example as example_doc

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))


ALL_PATHS = [p for p in paths(example_doc()) if p]


def accepts_or_explains(document) -> None:
    try:
        parse_config(document)
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and ":" in p for p in error.problems)


@FUZZ
@given(documents)
def test_arbitrary_documents(document):
    accepts_or_explains(document)


@FUZZ
@given(st.sampled_from(ALL_PATHS), documents)
def test_one_key_of_the_example_replaced(path, value):
    document = copy.deepcopy(example_doc())
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    accepts_or_explains(document)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(path)
