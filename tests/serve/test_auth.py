"""API keys: where they come from, failing closed, and what a header must look like to pass."""

from __future__ import annotations

import pytest

from madapt.serve.auth import ApiKeys, KeySourceError


def test_keys_from_a_file_and_an_env_var(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalpha-key\n\n  beta-key  \n")
    monkeypatch.setenv("TEST_KEYS", "gamma, delta,")
    keys = ApiKeys.load(str(keys_file), "TEST_KEYS")
    assert len(keys) == 4
    for key in ("alpha-key", "beta-key", "gamma", "delta"):
        assert keys.allows(f"Bearer {key}") and keys.allows(f"bearer  {key}")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "alpha-key", "Basic alpha-key", "Bearer alpha-ke", "Bearer alpha-key2"]
)
def test_anything_else_is_refused(header):
    assert not ApiKeys(["alpha-key"]).allows(header)


def test_no_source_means_authentication_off():
    assert ApiKeys.load(None, None) is None


def test_asking_for_keys_and_finding_none_fails_closed(tmp_path, monkeypatch):
    with pytest.raises(KeySourceError, match=r"api_keys_file .*missing-keys"):
        ApiKeys.load(str(tmp_path / "missing-keys"), None)
    (tmp_path / "empty").write_text("# nothing yet\n")
    monkeypatch.delenv("UNSET_KEYS", raising=False)
    with pytest.raises(KeySourceError, match=r"file .*empty or environment variable UNSET_KEYS holds none"):
        ApiKeys.load(str(tmp_path / "empty"), "UNSET_KEYS")
