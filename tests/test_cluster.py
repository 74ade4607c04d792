"""Which Ray cluster a command joins (madapt.cluster), without starting one: only one the user points at."""

from __future__ import annotations

from madapt import cluster


def test_only_a_cluster_the_user_points_at_is_joined(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray looks for the `ray start` cluster's address file
    cluster.configure()
    assert cluster.pointed_address() is None  # a private Ray (`madapt serve`'s, a test's) writes no such file

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.1:6379")  # what `ray start` writes
    assert cluster.pointed_address() == ("10.0.0.1:6379", cluster.START_CLUSTER)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster.pointed_address() == ("10.0.0.2:6379", "RAY_ADDRESS")
    cluster.configure(address="10.0.0.3:6379")
    try:
        assert cluster.pointed_address() == ("10.0.0.3:6379", "--address")
    finally:
        cluster.configure()
