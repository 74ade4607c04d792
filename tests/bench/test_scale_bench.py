"""`madapt bench scale` on a small stream: the replicas' real cache code, Serve's multiplexed routing, and
the ideal LRU beside them, with load latencies measured on a tiny shape (seconds)."""

from __future__ import annotations

import json

from madapt.bench import scale
from madapt.cli import main as cli


def test_a_small_stream_reports_both_caches_and_its_load_measurements(tmp_path):
    size = 1_000_000
    argv = ["bench", "scale", "--small", "--adapters", "300", "--replicas", "4", "--requests", "6000"]
    argv += ["--adapter-bytes", str(size), "--budget", str(400 * size), "--tight-budget", str(20 * size)]
    argv += ["--host-budget", str(60 * size), "--repeat", "1", "--out", str(tmp_path)]
    assert cli(argv) == 0
    report = json.loads((tmp_path / "scale.json").read_text())
    assert (tmp_path / "scale.md").read_text().count("| goal:") == 2
    measured = report["measured_loads"]["seconds"]
    assert len(measured["store"]) == 4 and len(measured["host"]) == 20  # 4 adapters, each loaded 6 times
    counted = 6000 - int(6000 * report["warmup"])
    goal, tight = report["scenarios"]["goal"], report["scenarios"]["tight"]
    for row in (goal, tight):
        assert row["madapt"]["requests"] == row["ideal_lru"]["requests"] == counted
    # everything fits: routing keeps one copy of each adapter, so only first requests are cold, as for the ideal
    assert goal["copies_per_held_adapter"] == 1.0
    for cache in ("madapt", "ideal_lru"):
        assert goal[cache]["cold_share"] == goal[cache]["first_request_share"]
    # 4 x 20 slots for 300 adapters: evictions, and re-loads from the host tier
    assert tight["madapt"]["cold_share"] > goal["madapt"]["cold_share"] and tight["madapt"]["host_loads"] > 0
    assert tight["madapt"]["bytes_moved_per_request"] == tight["madapt"]["cold_share"] * size


def test_an_evicted_id_leaves_the_routers_table():
    latency = {"host": [0.01], "store": [0.1]}
    simulation = scale.Simulation(replicas=2, budget=2, host_budget=10, size=1, latency=latency)
    for adapter in (0, 1, 2, 3):  # the fewest-ids rule spreads them: two per replica
        simulation.serve(adapter, None, True)
    assert [len(replica.device) for replica in simulation.replicas] == [2, 2]
    homes = {adapter: next(iter(simulation.holders[adapter])) for adapter in range(4)}
    simulation.serve(4, None, True)  # a full replica evicts one id: from then on it is not routed there
    evicted = [adapter for adapter in range(4) if not simulation.holders[adapter]]
    assert len(evicted) == 1 and simulation.holders[4] == {homes[evicted[0]]}
