"""Training jobs: every run is a child process, and the registry of runs lives on disk.

A job is a run folder under the runs root holding ``config.toml`` (what to train), ``job.json`` (the job's
state: queued, running, finished, stopped, failed or cancelled; its pid) and, once it runs, ``events.jsonl``
(progress, written by the engine) and ``job.log`` (the child's stdout and stderr). Nothing lives only in the
app's memory: a page reload, a second browser or a restarted app finds every run again by reading the folder.

Runs start one after another (a queue): :meth:`JobManager.tick` reaps finished children and starts the oldest
queued job when none is running. The app calls it from a background thread; tests call it directly. Two app
processes may share one runs folder: every read-modify-write of a ``job.json`` and "pick the next queued job and
start it" happen under an exclusive lock on ``<runs root>/.jobs.lock``, so a job never starts twice and no state
change (a cancel, a stop request, a reaped result) is overwritten by another process.

Stop is graceful: the manager writes ``RUN_DIR/STOP`` and sends SIGTERM to the child; the engine saves a
checkpoint and ends with an ``end`` event (status "stopped"). A child that is still alive ``stop_grace_s`` after
the request (a hung data loader, a stuck CUDA call) has its process group killed (SIGKILL); the job is then
recorded as stopped with a message pointing at the last checkpoint it saved. Children run in their own session (process
group), so a Ctrl+C in the app's terminal does not kill them and a restarted app re-attaches to them.
"""

from __future__ import annotations

import fcntl  # POSIX only (Linux, macOS): the registry lock is an flock; the app does not run on Windows
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from lycotrain.atomic import atomic_write_text
from lycotrain.engine.events import read_events
from lycotrain.errors import LycotrainError

JOB_FILE = "job.json"
CONFIG_FILE = "config.toml"
LOG_FILE = "job.log"
STOP_FILE = "STOP"
LOCK_FILE = ".jobs.lock"  # in the runs root; never a run (it has no job.json)
LIVE_STATES = ("queued", "running")

CommandFactory = Callable[[Path], list[str]]


def train_command(config_path: Path) -> list[str]:
    """The child process of a run: the same ``lycotrain train`` a user would type."""
    return [sys.executable, "-m", "lycotrain.cli", "train", str(config_path)]


@dataclass
class JobRecord:
    """What ``job.json`` holds. ``error`` is a one-line user-facing message, never a traceback."""

    id: str
    run_dir: str
    task: str
    name: str
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    returncode: int | None = None
    stop_requested: bool = False
    stop_requested_at: float | None = None  # when Stop was pressed: the grace period counts from here
    error: str | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass
class RunView:
    """Everything the live view shows, folded from a run's events (see ``engine/events.py``)."""

    task: str = ""
    method: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[int, str]] = field(default_factory=list)  # (step, absolute image path)
    texts: list[tuple[int, str, str]] = field(default_factory=list)  # (step, prompt, output)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, absolute path)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    preflight: dict[str, Any] | None = None
    end_status: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # name -> absolute path
    ranks: dict[str, int] = field(default_factory=dict)  # AdaLoRA: module -> kept rank, once the pattern is fixed
    ranks_step: int = 0
    rank_budget: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of the end event

    def apply(self, event: dict[str, Any], run_dir: Path) -> None:
        """Fold one event into the view."""
        kind = event.get("type")
        if kind == "start":
            self.task = event.get("task", self.task)
            self.method = event.get("method", self.method)
            self.total_steps = int(event.get("total_steps") or 0)
        elif kind == "preflight":
            self.preflight = event.get("report")
        elif kind == "step":
            self.step = int(event["step"])
            self.total_steps = int(event.get("total_steps") or self.total_steps)
            self.epoch = int(event.get("epoch") or 0)
            self.loss, self.lr = event.get("loss"), event.get("lr")
            self.it_s, self.eta_s = event.get("it_s"), event.get("eta_s")
            if self.loss is not None:
                self.losses.append((self.step, float(self.loss)))
        elif kind == "preview":
            step = int(event.get("step") or 0)
            self.previews += [(step, str(run_dir / path)) for path in event.get("images") or []]
            self.texts += [(step, t.get("prompt", ""), t.get("output", "")) for t in event.get("texts") or []]
        elif kind == "checkpoint":
            self.checkpoints.append((int(event.get("step") or 0), str(run_dir / event.get("path", ""))))
        elif kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        elif kind == "error":
            self.errors.append(str(event.get("message", "")))
        elif kind == "ranks":
            self.ranks = {str(k): int(v) for k, v in (event.get("ranks") or {}).items()}
            self.ranks_step, self.rank_budget = int(event.get("step") or 0), event.get("budget")
        elif kind == "end":
            self.end_status = event.get("status")
            self.step = int(event.get("step") or self.step)
            self.outputs = {name: str(run_dir / path) for name, path in (event.get("outputs") or {}).items()}
            self.extra = {k: v for k, v in event.items() if k not in ("type", "time", "status", "step", "outputs")}


class _ViewCache:
    """Reads each run's events incrementally (byte offset), so polling a long run stays cheap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, tuple[int, RunView]] = {}

    def view(self, run_dir: Path) -> RunView:
        key = str(run_dir)
        with self._lock:
            offset, view = self._views.get(key, (0, RunView()))
            events, offset = read_events(run_dir, offset)
            for event in events:
                view.apply(event, run_dir)
            self._views[key] = (offset, view)
            return view


def _writable_folder(folder: Path) -> Path:
    """``folder``, created if missing; refused at once when this user cannot write it (the queue's lock file and
    every run live there, so the app would otherwise fail on each scheduler tick)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_FILE, "ab"):
            pass
    except OSError as exc:
        raise LycotrainError(f"the runs folder {folder} cannot be written ({exc.strerror or exc}): choose a "
                             "folder you can write with --runs DIR") from None
    return folder


class JobManager:
    """Queue, start, stop and re-attach training jobs under ``runs_root``."""

    def __init__(self, runs_root: str | Path, command: CommandFactory = train_command,
                 env: dict[str, str] | None = None, stop_grace_s: float = 60.0) -> None:
        self.runs_root = _writable_folder(Path(runs_root).resolve())
        self._command = command
        self._env = env
        self.stop_grace_s = stop_grace_s
        self._lock = threading.RLock()
        self._children: dict[str, subprocess.Popen] = {}
        self._views = _ViewCache()
        self._thread: threading.Thread | None = None
        self._stop_thread = threading.Event()

    # ---- registry -------------------------------------------------------------------------------------
    def new_run_dir(self, name: str) -> Path:
        """Reserve a fresh run folder ``<runs_root>/<date>-<time>-<name>`` (never reuses an existing one)."""
        stem = time.strftime("%Y%m%d-%H%M%S") + "-" + _slug(name)
        for suffix in range(1000):
            run_dir = self.runs_root / (stem if suffix == 0 else f"{stem}-{suffix}")
            try:
                run_dir.mkdir(parents=True)
                return run_dir
            except FileExistsError:
                continue
        raise LycotrainError(f"could not create a run folder under {self.runs_root}; remove old runs")

    def submit(self, run_dir: Path, config_toml: str, task: str, name: str = "") -> JobRecord:
        """Write the run's config and queue it; it starts at the next :meth:`tick` when nothing else runs."""
        run_dir = Path(run_dir).resolve()
        atomic_write_text(run_dir / CONFIG_FILE, config_toml)
        record = JobRecord(id=run_dir.name, run_dir=str(run_dir), task=task, name=name or run_dir.name)
        self._save(record)
        self.tick()
        return self.get(record.id) or record

    def get(self, job_id: str) -> JobRecord | None:
        path = self.runs_root / job_id / JOB_FILE
        if "/" in job_id or not path.is_file():
            return None
        try:
            return JobRecord(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            return None  # a job.json from another version, or hand-edited: not ours to show

    def list(self, task: str | None = None) -> list[JobRecord]:
        """All jobs, newest first (optionally of one task)."""
        records = [r for p in self.runs_root.iterdir() if (r := self.get(p.name)) is not None]
        records = [r for r in records if task is None or r.task == task]
        return sorted(records, key=lambda r: r.created, reverse=True)

    def current(self, task: str | None = None) -> JobRecord | None:
        """The job a freshly opened page should show: the running one, else the next queued, else the newest."""
        records = self.list(task)
        for state in ("running", "queued"):
            live = [r for r in records if r.state == state]
            if live:
                return live[-1] if state == "queued" else live[0]
        return records[0] if records else None

    def view(self, job_id: str) -> RunView:
        record = self.get(job_id)
        if record is None:
            return RunView()
        return self._views.view(Path(record.run_dir))

    def _save(self, record: JobRecord) -> None:
        atomic_write_text(Path(record.run_dir) / JOB_FILE, json.dumps(asdict(record), indent=1))

    @contextmanager
    def _registry_lock(self) -> Iterator[None]:
        """Hold the registry against this process's other threads (the RLock) and against other app processes on
        the same runs root (an exclusive flock), for a read-modify-write of job records.

        Not reentrant: a nested call would wait for its own flock (held on another descriptor). The descriptor is
        not inherited by the training children (Python opens files non-inheritable and Popen closes the others),
        so a running job never holds the lock; closing it releases the lock, also when the app dies."""
        with self._lock, open(self.runs_root / LOCK_FILE, "ab") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    # ---- scheduling -----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Reap ended children, then start the oldest queued job if nothing runs."""
        with self._registry_lock():
            records = self.list()
            self._forget_children_reaped_elsewhere(records)
            running = [r for r in records if r.state == "running" and not (self._kill_if_overdue(r) or self._reap(r))]
            queued = sorted((r for r in records if r.state == "queued"), key=lambda r: r.created)
            if not running and queued:
                self._start(queued[0])

    def _forget_children_reaped_elsewhere(self, records: list[JobRecord]) -> None:
        """Wait for our children whose jobs another app process already recorded as ended (no zombies left)."""
        running = {r.id for r in records if r.state == "running"}
        for job_id in [j for j in self._children if j not in running]:
            if self._children[job_id].poll() is not None:
                del self._children[job_id]

    def _start(self, record: JobRecord) -> None:
        run_dir = Path(record.run_dir)
        env = dict(os.environ if self._env is None else self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(run_dir / LOG_FILE, "ab") as log:
            try:
                child = subprocess.Popen(self._command(run_dir / CONFIG_FILE), cwd=run_dir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            except OSError as exc:
                record.state, record.ended, record.error = "failed", time.time(), f"could not start the job: {exc}"
                self._save(record)
                return
        self._children[record.id] = child
        record.state, record.started, record.pid = "running", time.time(), child.pid
        self._save(record)

    def _reap(self, record: JobRecord) -> bool:
        """If the job's process has ended, record its final state and return True."""
        child = self._children.get(record.id)
        if child is not None:
            returncode = child.poll()
            if returncode is None:
                return False
            del self._children[record.id]
        elif _process_alive(record):
            return False  # started by an earlier app process and still running: re-attached
        else:
            returncode = None  # not our child: its exit code is gone, the events tell how it ended
        view = self._views.view(Path(record.run_dir))
        record.returncode, record.ended, record.pid = returncode, time.time(), None
        if view.end_status in ("finished", "stopped", "failed"):
            record.state = view.end_status
        else:
            record.state = "stopped" if record.stop_requested else "failed"
        if record.state == "failed":
            record.error = _failure_message(record, view)
        self._save(record)
        return True

    def _kill_if_overdue(self, record: JobRecord) -> bool:
        """SIGKILL the process group of a job that ignored Stop for ``stop_grace_s``; True when it was killed."""
        if (not record.stop_requested or record.stop_requested_at is None or record.pid is None
                or time.time() - record.stop_requested_at < self.stop_grace_s or not self._running(record)):
            return False
        try:
            os.killpg(record.pid, signal.SIGKILL)  # its own session: the group is the child and its workers
        except ProcessLookupError:
            pass  # ended between the check and the kill: reaped like any ended job
        child = self._children.pop(record.id, None)
        returncode = _wait(child, timeout_s=5.0) if child is not None else None
        checkpoints = self._views.view(Path(record.run_dir)).checkpoints
        resume = (f"resume from its last checkpoint, {checkpoints[-1][1]} (step {checkpoints[-1][0]})"
                  if checkpoints else "it saved no checkpoint, so a new run starts from the beginning")
        record.state, record.ended, record.pid, record.returncode = "stopped", time.time(), None, returncode
        record.error = (f"the job did not stop within {self.stop_grace_s:g} s of the stop request and was killed; "
                        f"{resume}")
        self._save(record)
        return True

    def _running(self, record: JobRecord) -> bool:
        child = self._children.get(record.id)
        return child.poll() is None if child is not None else _process_alive(record)

    def stop(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job, or ask a running one to stop (it saves a checkpoint first)."""
        with self._registry_lock():
            record = self.get(job_id)
            if record is None or not record.live:
                return record
            if record.state == "queued":
                record.state, record.ended = "cancelled", time.time()
            else:
                atomic_write_text(Path(record.run_dir) / STOP_FILE, "stop requested from the app\n")
                record.stop_requested, record.stop_requested_at = True, time.time()
                if record.pid is not None:
                    try:
                        os.kill(record.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass  # already gone: the next tick reaps it
            self._save(record)
            return record

    def start_background(self, interval_s: float = 0.5) -> None:
        """Run :meth:`tick` in a daemon thread so the queue advances even with no browser open."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop_thread.wait(interval_s):
                try:
                    self.tick()
                except OSError as exc:  # a full disk or a vanished folder must not kill the scheduler
                    print(f"lycotrain jobs: {exc}", file=sys.stderr)

        self._thread = threading.Thread(target=loop, name="lycotrain-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; running jobs keep running (a restarted app re-attaches)."""
        self._stop_thread.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _process_alive(record: JobRecord) -> bool:
    """Is the job's pid still its process? (The pid could have been reused after a reboot.)"""
    if record.pid is None:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{record.pid}/cmdline")
    if cmdline.exists():
        try:
            return str(Path(record.run_dir) / CONFIG_FILE) in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def _wait(child: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit code of a killed child; None if it has not gone yet (stuck in the kernel: a driver call)."""
    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _failure_message(record: JobRecord, view: RunView) -> str:
    """The engine's own error message when it wrote one, else the last line of the log (no traceback)."""
    if view.errors:
        return view.errors[-1]
    log = Path(record.run_dir) / LOG_FILE
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] \
        if log.exists() else []
    last = lines[-1] if lines else "no output"
    code = f" (exit code {record.returncode})" if record.returncode is not None else ""
    return f"the training process ended without finishing{code}: {last[:500]} — full log: {log}"


def _slug(name: str) -> str:
    """A file-name-safe version of a run name."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.strip())
    return cleaned.strip("-")[:40] or "run"
