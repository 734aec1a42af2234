"""No requester starves another: issue 21's starving shapes, against a real Mosquitto and the
agent (real model, 4 jobs at once) as a subprocess.

A careful sensor sends one classify job at a time; its quiet latencies are measured first,
then again beside a greedy requester that keeps many jobs outstanding. On 9190a94 the
sensor's jobs waited 45 s behind slow extractions, were never answered behind a priority-9
flood, and took 3.4 s (p50) behind jobs that each brought new labels.

What is asserted does not depend on how fast the machine is (beside a CPU hog, probes took
4-9 s at p95 while the scheduler was as fair as on quiet cores, from the agent's own log):
every probe is answered; no flood job is started ahead of a waiting probe more than twice
(the starving scheduler let the flood's whole backlog by); and a probe's wait in the queue
stays within twice its own running time (p95; starving, it waited out a whole extraction,
seconds against a classify's tenths). The wall-clock figures are printed beside the quiet
ones; bench/fairness.py runs the long version and compares them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from edge_agent.adapters.broker import LocalBroker
from edge_agent.core.metrics import percentile
from tests.harness.fairness import (
    Flood,
    Latencies,
    Prober,
    Shape,
    busy_classify,
    new_labels,
    slow_extract,
    wait_healthy,
    wait_idle,
)
from tests.harness.process import AgentProcess, start_agent_process

pytestmark = pytest.mark.model

PROBES = 20


@pytest.fixture(scope="module")
def agent(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    running = start_agent_process(
        broker.url,
        f"st{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp("agent"),
        env={"EDGE_AGENT_JOBS__PARALLEL": "4"},
    )
    yield running
    running.kill()


@pytest.fixture(scope="module")
def prober(broker: LocalBroker, agent: AgentProcess) -> Iterator[Prober]:
    probe = Prober(broker.port, agent.prefix, agent.device_id)
    probe.run(3)  # warm: the shape's prefix and calibration
    yield probe
    probe.close()


@pytest.fixture(scope="module")
def quiet(prober: Prober) -> Latencies:
    figures = prober.run(PROBES)
    print(f"\nquiet: {figures.line()}")
    return figures


def beside(
    broker: LocalBroker, agent: AgentProcess, prober: Prober, shape: Shape, outstanding: int,
    priority: int = 5,
) -> tuple[Latencies, Flood]:  # fmt: skip
    # each reproduction alone: the last flood's jobs are answered first
    assert wait_idle(broker.port, agent.prefix, agent.device_id)
    with Flood(
        broker.port, agent.prefix, agent.device_id, shape, outstanding, priority=priority
    ) as flood:
        loaded = prober.run(PROBES, timeout=60)
    return loaded, flood


# A probe arriving while the scheduler is choosing may see one flood job chosen in the
# same round (seen at most once per probe, quiet and beside a CPU hog)
OVERTAKES = 2


def overtaken(agent: AgentProcess, probe_ids: set[str]) -> dict[str, int]:
    """For each probe: how many other jobs were started after it was queued and before it
    started (from the agent's log, in its order)."""
    queued: dict[str, int] = {}
    started: list[tuple[int, str]] = []
    for i, event in enumerate(agent.log_events()):
        job_id = event.get("job_id")
        if event.get("event") == "job.queued" and job_id:
            queued.setdefault(job_id, i)
        elif event.get("event") == "job.started" and job_id:
            started.append((i, job_id))
    out = {}
    for i, job_id in started:
        if job_id in probe_ids and job_id in queued:
            out[job_id] = sum(
                1 for k, other in started if queued[job_id] < k < i and other not in probe_ids
            )
    return out


def check(
    name: str, agent: AgentProcess, prober: Prober, quiet: Latencies, loaded: Latencies,
    flood: Flood,
) -> None:  # fmt: skip
    print(f"\n{name}: {loaded.line()}; the flood got {dict(flood.statuses)} {dict(flood.codes)}")
    print(f"quiet: {quiet.line()}")
    assert loaded.statuses == {"done": PROBES}
    # The first probe meets the flood's first batch, started before any fair choice could
    # be made (a running batch is not preempted for fairness): the claim is about the
    # probes that follow.
    steady = prober.replies[1:]
    ids = {reply["id"] for reply in steady}
    passed = overtaken(agent, ids)
    assert set(passed) == ids, "every probe's start is in the agent's log"
    assert max(passed.values()) <= OVERTAKES, passed
    waits = [reply["timings"]["queue_ms"] for reply in steady]
    runs = [reply["timings"]["total_ms"] - reply["timings"]["queue_ms"] for reply in steady]
    assert (percentile(waits, 95) or 0.0) <= 2 * (percentile(runs, 95) or 0.0) + 250, (waits, runs)


def test_slow_extractions_of_one_requester_do_not_hold_up_another(
    broker: LocalBroker, agent: AgentProcess, prober: Prober, quiet: Latencies
) -> None:
    loaded, flood = beside(broker, agent, prober, slow_extract, outstanding=4)
    check("beside 4 slow extractions", agent, prober, quiet, loaded, flood)


@pytest.mark.timeout(600)
def test_a_priority_9_flood_cannot_take_every_slot(
    broker: LocalBroker, agent: AgentProcess, prober: Prober, quiet: Latencies
) -> None:
    # health turns degraded only from ok, and any reason is held 30 s (the cost-bound test
    # runs last for that reason; this wait keeps the test right in any order)
    assert wait_healthy(broker.port, agent.prefix, agent.device_id, timeout=120)
    seen = len(agent.log_events())
    loaded, flood = beside(broker, agent, prober, busy_classify, outstanding=14, priority=9)
    check("beside 14 outstanding priority-9 jobs", agent, prober, quiet, loaded, flood)
    assert flood.codes["overloaded"] > 0  # its excess, with retry_after_ms
    # Two guards keep the flood to its share: the intake refuses what it holds beyond it,
    # and health says "saturated" when it runs every slot while another's job waits. Which
    # acts depends on how fast its retries come back (quiet, the refusals kept it below
    # every slot in one run of three); test_worker checks the health reason exactly.
    events = agent.log_events()[seen:]
    refused = [e for e in events if e.get("event") == "job.rejected" and "its share" in str(e.get("reason"))]  # fmt: skip
    saturated = [e for e in events if e.get("event") == "health.changed" and "saturated by one requester" in " ".join(e.get("reasons") or [])]  # fmt: skip
    assert refused or saturated, events[-20:]


def test_new_label_sets_cost_their_requester_not_everyone(
    broker: LocalBroker, agent: AgentProcess, prober: Prober, quiet: Latencies
) -> None:
    loaded, flood = beside(broker, agent, prober, new_labels, outstanding=4)
    check("beside 4 outstanding jobs of new label sets", agent, prober, quiet, loaded, flood)
    assert flood.codes["overloaded"] > 0


# Last in the file: the cost bound it trips keeps health degraded for worker.HOLD_S (30 s),
# and the priority-9 test needs health ok before its flood.
@pytest.mark.timeout(900)
def test_slow_extractions_end_failed_with_cost_exceeded(
    broker: LocalBroker, agent: AgentProcess
) -> None:
    # the last test's flood is answered first; then two of ours. The wait ends when they
    # come: its bound only has to hold on a machine doing other work (a CPU hog beside the
    # suite made each slow extraction take several times as long)
    assert wait_idle(broker.port, agent.prefix, agent.device_id, timeout=300)
    with Flood(broker.port, agent.prefix, agent.device_id, slow_extract, 2) as flood:
        assert flood.wait_for(2, timeout=280), (flood.statuses, flood.codes)
    assert flood.codes["cost_exceeded"] >= 2, (flood.statuses, flood.codes)
