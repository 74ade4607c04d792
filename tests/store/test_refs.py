"""The one reader of adapter refs (madapt.store.refs), as the store, releases and the HTTP edge use it."""

import pytest

from madapt.store import StoreError
from madapt.store.refs import Ref, RefError, parse_ref


def test_a_ref_is_a_name_and_what_follows_the_at():
    assert Ref.parse("coding") == Ref("coding")
    assert Ref.parse("coding@3").version == 3 and Ref.parse("coding@3").label is None
    assert Ref.parse("coding@latest").latest and Ref.parse("coding@latest").version is None
    assert Ref.parse("coding@prod").label == "prod" and Ref.parse("coding@prod").version is None


@pytest.mark.parametrize(
    ("value", "options", "needle"),
    [
        ("coding@prod", {"labels": False}, "1-9 ASCII digits or 'latest'"),
        ("coding@", {}, "nothing after '@'"),
        ("coding@" + "1" * 50, {}, "at most 9 digits"),
        ("coding@\u0663", {}, "printable ASCII"),  # int() would read it as 3
        ("coding@1\n", {}, "printable ASCII"),
        ("x" * 101, {"max_length": 100, "check_name": False}, "longer than 100"),
        ("../x@1", {}, "invalid adapter id"),
        (3, {}, "not a string"),
    ],
)
def test_malformed_refs_are_refused_with_what_is_wrong(value, options, needle):
    with pytest.raises(RefError, match=needle) as refused:
        Ref.parse(value, **options)
    assert isinstance(refused.value, StoreError) and len(str(refused.value)) < 200


def test_the_http_edge_checks_the_shape_only():
    assert Ref.parse("@1", check_name=False).version == 1  # the store behind it checks the name


def test_the_store_reads_versions_and_latest_only():
    assert parse_ref("coding@latest") == ("coding", None)
    with pytest.raises(StoreError, match="version"):
        parse_ref("coding@prod")
