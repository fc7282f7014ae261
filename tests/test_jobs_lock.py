"""Two app processes on one runs folder: they queue, cancel, stop and start jobs at the same time, and still every
job is recorded, no cancel is lost, and each job that was not cancelled started exactly once."""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from functools import partial
from pathlib import Path

from lycotrain.jobs import JobManager

JOBS_PER_PROCESS = 12


def _instant_job(starts: Path, config: Path) -> list[str]:
    """Stands in for ``lycotrain train CONFIG``. The manager asks for the command once per start, so this logs
    the start (one short O_APPEND write is atomic across processes); the child then ends at once. The config
    path is in its command line, as in the real command, so the other app process sees a live job while it runs."""
    with open(starts, "a", encoding="utf-8") as log:
        log.write(config.parent.name + "\n")
    return ["sh", "-c", "exit 0", "sh", str(config)]


def _hammer(runs_root: str, starts: str, worker: int, barrier, results) -> None:
    manager = JobManager(runs_root, command=partial(_instant_job, Path(starts)))
    rng = random.Random(worker)
    barrier.wait()  # both processes submit at the same moment
    for index in range(JOBS_PER_PROCESS):
        job = manager.submit(manager.new_run_dir(f"w{worker}-{index}"), "steps = 1\n", task="text")
        if rng.random() < 0.4:
            manager.stop(job.id)  # a cancel if it is still queued, a stop request if it already runs
        manager.tick()
    deadline = time.time() + 20
    while any(r.live for r in manager.list()) and time.time() < deadline:
        manager.tick()
        time.sleep(0.002)
    results.put((worker, len(manager._children)))


def test_two_app_processes_never_start_a_job_twice_nor_lose_an_update(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    runs_root, starts = tmp_path / "runs", tmp_path / "starts.log"
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_hammer, args=(str(runs_root), str(starts), w, barrier, results))
               for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0]
    children_left = dict(results.get(timeout=5) for _ in workers)
    assert children_left == {0: 0, 1: 0}  # a child reaped by the other process was still waited for

    records = JobManager(runs_root).list()
    assert len(records) == 2 * JOBS_PER_PROCESS  # every queued job is recorded
    assert not any(r.live for r in records)
    started = Counter(starts.read_text().split()) if starts.exists() else Counter()
    for record in records:
        expected = 0 if record.state == "cancelled" else 1  # a cancelled job never ran: its cancel was kept
        assert started[record.id] == expected, (record.id, record.state, started[record.id])
    assert set(started) <= {r.id for r in records}
    assert {r.state for r in records} <= {"cancelled", "stopped", "failed"}  # the stand-in writes no events
