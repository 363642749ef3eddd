"""The agent's Prometheus counters mirror the pure cores' running totals."""

from __future__ import annotations

from fleetloop_agent.metrics import AgentMetrics


def value(m: AgentMetrics, name: str) -> float:
    return m.registry.get_sample_value(f"fleetloop_agent_{name}_total") or 0.0


def test_totals_are_mirrored_by_their_increase() -> None:
    m = AgentMetrics()
    m.sync_totals(trigger_evaluations=10, ring_buffer_dropped_samples=0)
    m.sync_totals(trigger_evaluations=25, ring_buffer_dropped_samples=7, ring_buffer_late_samples=2)
    m.sync_totals(trigger_evaluations=25)  # no change: nothing added
    assert value(m, "trigger_evaluations") == 25
    assert value(m, "ring_buffer_dropped_samples") == 7
    assert value(m, "ring_buffer_late_samples") == 2
    assert value(m, "trigger_late_evaluations") == 0
