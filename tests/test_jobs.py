"""Jobs: child processes, queue, graceful stop, crash reporting and re-attach, driven with a fake training
script that speaks the events contract (the real engine is driven by the browser tests)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from lycotrain.errors import LycotrainError
from lycotrain.jobs import JobManager, RunView

# A stand-in for `lycotrain train CONFIG`: reads a few settings from the config text, writes events, honours
# RUN_DIR/STOP and SIGTERM like the engine does (checkpoint, then an `end` event with status "stopped").
FAKE_TRAIN = r'''
import signal, sys, time, tomllib
from pathlib import Path
from lycotrain.engine.events import EventWriter
config_path = Path(sys.argv[1])
cfg = tomllib.loads(config_path.read_text())
run_dir, steps, delay = config_path.parent, cfg["steps"], cfg.get("delay", 0.0)
if cfg.get("crash"):
    print("Traceback (most recent call last):\n  File x\nRuntimeError: the fake engine broke")
    sys.exit(1)
events = EventWriter(run_dir)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
events.emit("start", run_dir=str(run_dir), task="image", method="loha", total_steps=steps, config=cfg)
events.emit("warning", message="3 images have no caption")
for step in range(1, steps + 1):
    time.sleep(delay)
    events.emit("step", step=step, total_steps=steps, epoch=0, loss=1.0 / step, lr=1e-4, it_s=10.0,
                eta_s=(steps - step) * delay)
    if step == 2:
        (run_dir / "previews").mkdir(exist_ok=True)
        (run_dir / "previews" / "s2.png").write_bytes(b"png")
        events.emit("preview", step=step, images=["previews/s2.png"])
    if stop or (run_dir / "STOP").exists():
        events.emit("checkpoint", step=step, path=f"checkpoints/step-{step}")
        events.emit("end", status="stopped", step=step, outputs={})
        sys.exit(0)
(run_dir / "out.safetensors").write_bytes(b"x")
events.emit("end", status="finished", step=steps, outputs={"adapter": "out.safetensors"}, rank_pattern={"a": 2})
'''


@pytest.fixture
def manager(tmp_path: Path) -> JobManager:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return JobManager(tmp_path / "runs", command=lambda config: [sys.executable, str(script), str(config)])


def _submit(manager: JobManager, name: str, **settings) -> str:
    toml = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in settings.items())
    return manager.submit(manager.new_run_dir(name), toml, task="image", name=name).id


def _wait(manager: JobManager, job_id: str, states: tuple[str, ...], timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        manager.tick()
        if manager.get(job_id).state in states:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {manager.get(job_id).state}, wanted {states}")


def test_run_finishes_and_its_events_fold_into_the_view(manager: JobManager) -> None:
    job_id = _submit(manager, "demo", steps=4)
    assert manager.get(job_id).state == "running"
    _wait(manager, job_id, ("finished",))
    view = manager.view(job_id)
    assert (view.step, view.total_steps, view.method) == (4, 4, "loha")
    assert [s for s, _ in view.losses] == [1, 2, 3, 4]
    assert view.previews == [(2, str(Path(manager.get(job_id).run_dir) / "previews/s2.png"))]
    assert view.warnings == ["3 images have no caption"]
    assert Path(view.outputs["adapter"]).read_bytes() == b"x"
    assert view.extra["rank_pattern"] == {"a": 2}


def test_runs_are_queued_one_after_another(manager: JobManager) -> None:
    first = _submit(manager, "first", steps=3, delay=0.2)
    second = _submit(manager, "second", steps=1)
    assert manager.get(second).state == "queued"
    assert manager.current().id == first
    _wait(manager, first, ("finished",))
    _wait(manager, second, ("running", "finished"))
    assert manager.get(second).started >= manager.get(first).ended


def test_stop_is_graceful_and_keeps_a_checkpoint(manager: JobManager) -> None:
    job_id = _submit(manager, "long", steps=1000, delay=0.02)
    _wait_for(lambda: manager.view(job_id).step >= 2)
    manager.stop(job_id)
    assert (Path(manager.get(job_id).run_dir) / "STOP").exists()
    _wait(manager, job_id, ("stopped",))
    view = manager.view(job_id)
    assert view.end_status == "stopped" and view.checkpoints and view.step < 1000


def test_a_queued_job_can_be_cancelled(manager: JobManager) -> None:
    first = _submit(manager, "first", steps=1000, delay=0.02)
    second = _submit(manager, "second", steps=1)
    assert manager.stop(second).state == "cancelled"
    manager.stop(first)
    _wait(manager, first, ("stopped",))
    manager.tick()
    assert manager.get(second).state == "cancelled"


def test_a_crash_is_reported_in_one_line_without_traceback(manager: JobManager) -> None:
    job_id = _submit(manager, "broken", steps=1, crash=True)
    _wait(manager, job_id, ("failed",))
    error = manager.get(job_id).error
    assert "RuntimeError: the fake engine broke" in error and "exit code 1" in error
    assert "Traceback" not in error
    ok = _submit(manager, "after", steps=1)  # the manager keeps working
    _wait(manager, ok, ("finished",))


def test_a_new_manager_reattaches_to_a_running_job(manager: JobManager, tmp_path: Path) -> None:
    job_id = _submit(manager, "long", steps=40, delay=0.05)
    _wait_for(lambda: manager.view(job_id).step >= 1)
    restarted = JobManager(manager.runs_root)  # an app restart: no child handles, only the folder
    restarted.tick()
    assert restarted.get(job_id).state == "running"
    assert restarted.current().id == job_id
    step = restarted.view(job_id).step
    _wait_for(lambda: restarted.view(job_id).step > step)
    _wait(restarted, job_id, ("finished",))
    manager.tick()  # the original manager reaps its child without changing the outcome
    assert manager.get(job_id).state == "finished"


def test_view_of_an_unknown_job_is_empty(manager: JobManager) -> None:
    assert manager.view("nope") == RunView()
    assert manager.get("../etc") is None


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# A job that ignores SIGTERM and RUN_DIR/STOP (a hung data loader), with a worker in its process group.
STUBBORN_TRAIN = r'''
import signal, subprocess, sys, time
from pathlib import Path
from lycotrain.engine.events import EventWriter
run_dir = Path(sys.argv[1]).parent
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                           "signal.SIG_IGN); time.sleep(300)"])
(run_dir / "worker.pid").write_text(str(worker.pid))
events = EventWriter(run_dir)
events.emit("start", run_dir=str(run_dir), task="image", method="loha", total_steps=100, config={})
events.emit("checkpoint", step=3, path="checkpoints/step-3")
while True:
    time.sleep(0.1)
'''


def test_a_job_that_ignores_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_TRAIN)
    manager = JobManager(tmp_path / "runs", command=lambda config: [sys.executable, str(script), str(config)],
                         stop_grace_s=0.5)
    job_id = _submit(manager, "stubborn", steps=100)
    run_dir = Path(manager.get(job_id).run_dir)
    deadline = time.time() + 30
    while not (manager.view(job_id).checkpoints and (run_dir / "worker.pid").exists()) and time.time() < deadline:
        time.sleep(0.05)
    worker_pid = int((run_dir / "worker.pid").read_text())
    manager.stop(job_id)
    manager.tick()
    assert manager.get(job_id).state == "running"  # within the grace period: still waiting for it
    _wait(manager, job_id, ("stopped",), timeout=10)
    record = manager.get(job_id)
    assert "killed" in record.error and str(run_dir / "checkpoints/step-3") in record.error
    assert record.pid is None and record.returncode == -9
    deadline = time.time() + 5
    while _alive(worker_pid) and time.time() < deadline:  # its whole process group went, workers included
        time.sleep(0.05)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan is reaped by whatever init the container has, maybe never)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\tZ" not in next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_a_runs_folder_that_cannot_be_written_is_refused_at_once(tmp_path: Path) -> None:
    """Not on every scheduler tick: the message names the folder and the --runs option."""
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(LycotrainError, match=r"a-file/runs cannot be written .*--runs DIR"):
        JobManager(tmp_path / "a-file" / "runs")
