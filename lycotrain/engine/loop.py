"""The training loop shared by every task. Read :meth:`Trainer.run` top to bottom: setup, resume, loop, save.

What the loop guarantees, whatever the task:

* accelerate drives devices and mixed precision; ``accelerate launch`` gives several processes. Each process
  trains on its own share of the batches and the adapter gradients are averaged across processes after every
  accumulation window (one all-reduce of the small adapter gradients; no DDP wrapper, so a task never has to
  care which of its modules hold trainable parameters).
* Exact resume: a checkpoint holds the adapters, optimizer, schedule, the position in the data and every
  process's RNG state; the data order of an epoch depends only on (seed, epoch), so a resumed run continues
  as if it had never stopped.
* "Continue for +N steps" (``add_steps``) on a finished run: the LR schedule is rebuilt for the new total and
  fast-forwarded to the current step, i.e. from there on the LR is exactly what a run planned from the start
  with the new total would use (a decayed cosine comes back up to where that longer curve is; warmup is not
  repeated because it lies in the past).
* A stop request (SIGTERM, SIGINT, or the file ``RUN_DIR/STOP``) ends the run after the current optimizer step
  with a checkpoint and an ``end`` event with status "stopped".
* A NaN/inf loss stops the run before the optimizer applies it; the last good checkpoint is kept and named.
* Any error becomes an ``error`` event with a message for the user (the traceback goes to ``error.log``) and an
  ``end`` event with status "failed"; ``train`` returns instead of raising.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from lycotrain.engine import checkpoint as ckpt
from lycotrain.engine.config import Config
from lycotrain.engine.events import EventWriter
from lycotrain.engine.optim import build_optimizer, build_scheduler, fast_forward
from lycotrain.engine.task import Task, make_task
from lycotrain.engine.tensorboard import TensorBoardSink, require_tensorboard
from lycotrain.errors import ConfigError, LycotrainError

STOP_FILE = "STOP"
ERROR_LOG = "error.log"


class NonFiniteLossError(LycotrainError):
    """The loss became NaN or infinite."""


@dataclass
class Plan:
    """How many micro-batches, optimizer steps and epochs this run has."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def train(config: Config, *, resume: bool = False, add_steps: int = 0, task: Task | None = None,
          listener: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``config`` to the end (or to a stop request). Returns ``{"status", "step", "outputs", "message"}``.

    ``resume`` continues ``config.run_dir`` from its latest checkpoint; ``add_steps`` extends it by N steps.
    ``listener`` receives every event in-process (the CLI's progress bar).
    """
    if not config.run_dir:
        raise ConfigError("run_dir is empty; set run_dir = \"runs/my-run\" (the folder for outputs)")
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.training.mixed_precision)
    run_dir = Path(config.run_dir)
    events = EventWriter(run_dir, listener) if accelerator.is_main_process else _SilentEvents(run_dir)
    trainer = Trainer(config, accelerator, events, task or make_task(config.task))
    try:
        with _stop_signals(trainer):
            return trainer.run(resume=resume, add_steps=add_steps)
    except LycotrainError as exc:
        return trainer.fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure must reach the user as an event, not a traceback
        return trainer.fail(f"unexpected error: {type(exc).__name__}: {exc} (full traceback in "
                            f"{run_dir / ERROR_LOG})")


class Trainer:
    def __init__(self, config: Config, accelerator: Any, events: EventWriter, task: Task) -> None:
        self.config, self.accelerator, self.events, self.task = config, accelerator, events, task
        self.run_dir = Path(config.run_dir)
        self.position = ckpt.Position()
        self.stop_signalled = False
        self._step_times: deque[float] = deque(maxlen=20)

    # ---- the whole run, in order ------------------------------------------------------------------------
    def run(self, *, resume: bool, add_steps: int) -> dict[str, Any]:
        from accelerate.utils import set_seed

        config, task = self.config, self.task
        state = self._find_resume_state(resume, add_steps)
        self._attach_tensorboard(state["position"].step if state is not None else None)
        if state is not None and add_steps:
            config.training.max_steps = state["position"].total_steps + add_steps

        # setup: the task builds its model, adapters and data; the optimizer and schedule follow the plan
        set_seed(config.seed)
        task.setup(config, self.accelerator, self.events)
        self.params = [p for group in task.param_groups() for p in group["params"] if p.requires_grad]
        self.optimizer = self.accelerator.prepare(build_optimizer(config.training, task.param_groups()))
        self.plan = self._plan()
        self.scheduler = build_scheduler(config.training, self.optimizer, self.plan.total_steps)
        if state is not None:
            self._restore(state)
        else:
            self._same_start_on_every_process()
        self.position.total_steps = self.plan.total_steps
        self._warn_if_warmup_covers_the_run()

        if self.accelerator.is_main_process:
            config.write_toml(self.run_dir / "config.toml")
        self.events.emit("start", run_dir=str(self.run_dir), task=config.task, method=config.network.method,
                         total_steps=self.plan.total_steps, steps_per_epoch=self.plan.steps_per_epoch,
                         epochs=self.plan.epochs, resumed_from=self.position.step if state else None,
                         config=config.to_dict())
        if config.sample.at_start and state is None and config.sample.prompts:
            self._preview()

        stopped = self._train_epochs()

        last = self._checkpoint()
        if stopped:
            return self._end("stopped", {"checkpoint": last})
        outputs = self._on_main(lambda: self.task.save_adapter(self.run_dir, self.position.step)) or {}
        if config.sample.at_end and config.sample.prompts:
            self._preview(exported=outputs)
        return self._end("finished", {**outputs, "checkpoint": last})

    def _train_epochs(self) -> bool:
        """The loop proper. Returns True when a stop request ended it early."""
        accelerator, task, position = self.accelerator, self.task, self.position
        grad_accum = self.config.training.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        while position.step < self.plan.total_steps:
            source, batches = self._epoch(position.epoch)
            window_loss = torch.zeros((), device=accelerator.device)
            loader = self._loader(source, batches[position.micro_batch:])
            for micro, batch in enumerate(loader, start=position.micro_batch):
                window = min(grad_accum, len(batches) - (micro // grad_accum) * grad_accum)
                with accelerator.autocast():
                    loss = task.training_step(batch, position.step)
                if not loss.requires_grad:
                    raise LycotrainError("the loss does not depend on any trainable parameter: the adapters are "
                                         "not in the model's forward pass (check network.preset/include/exclude)")
                accelerator.backward(loss / window)
                window_loss += loss.detach().float() / window
                if (micro + 1) % grad_accum and micro + 1 < len(batches):
                    continue
                self._optimizer_step(window_loss)
                position.step, position.micro_batch = position.step + 1, micro + 1
                window_loss = torch.zeros((), device=accelerator.device)
                task.after_optimizer_step(position.step, self.plan.total_steps)
                self.optimizer.zero_grad(set_to_none=True)  # after the hook: AdaLoRA's allocator reads the gradients
                self._after_step()
                if self._stop_requested():
                    return True
                if position.step >= self.plan.total_steps:
                    return False
            position.epoch, position.micro_batch = position.epoch + 1, 0
            if self.config.save.every_n_epochs and position.epoch % self.config.save.every_n_epochs == 0:
                self._checkpoint()
        return False

    # ---- one optimizer step ------------------------------------------------------------------------------
    def _optimizer_step(self, window_loss: torch.Tensor) -> None:
        loss = self._mean_over_processes(window_loss)
        if not torch.isfinite(loss):
            last = ckpt.latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {self.position.step + 1}; training stopped and {kept}. "
                "Lower training.lr, or use training.mixed_precision = \"bf16\" or \"no\" instead of fp16")
        self._average_gradients()
        if self.config.training.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.training.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
            self.scheduler.step()
        self.last_loss = loss.item()

    def _after_step(self) -> None:
        """Progress event; periodic checkpoint and preview."""
        now = time.perf_counter()
        self._step_times.append(now)
        step, total = self.position.step, self.plan.total_steps
        it_s = (len(self._step_times) - 1) / (now - self._step_times[0]) if len(self._step_times) > 1 else 0.0
        self.events.emit("step", step=step, total_steps=total, epoch=self.position.epoch, loss=self.last_loss,
                         lr=self.scheduler.get_last_lr()[0], lrs=self.scheduler.get_last_lr(), it_s=round(it_s, 4),
                         eta_s=round((total - step) / it_s, 1) if it_s else None)
        save, sample = self.config.save, self.config.sample
        if save.every_n_steps and step % save.every_n_steps == 0:
            self._checkpoint()
        final_preview_follows = step == total and sample.at_end
        if sample.every_n_steps and step % sample.every_n_steps == 0 and sample.prompts and not final_preview_follows:
            self._preview()

    # ---- data ----------------------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[DataLoader, list[list[int]]]:
        """The task's loader for ``epoch`` and this process's share of its batches (index lists, in order)."""
        source = self.task.dataloader(epoch)
        batches = [list(b) for b in source.batch_sampler]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1:  # pad by wrapping around so every process does the same number of steps
            batches = (batches + batches[:(-len(batches)) % world])[rank::world]
        return source, batches

    def _loader(self, source: DataLoader, batches: list[list[int]]) -> Iterator[Any]:
        """Load ``batches`` with the task's dataset and collate function, onto the accelerator's device."""
        from accelerate.utils import send_to_device

        loader = DataLoader(source.dataset, batch_sampler=batches, collate_fn=source.collate_fn,
                            num_workers=source.num_workers,
                            generator=torch.Generator().manual_seed(self.config.seed))  # keeps the global RNG
        for batch in loader:
            yield send_to_device(batch, self.accelerator.device)

    def _plan(self) -> Plan:
        training = self.config.training
        micro = len(self._epoch(0)[1])
        if micro == 0:
            raise LycotrainError("the dataset gives no batch at all (too few items for the batch size and the "
                                 "number of processes); add data or lower training.batch_size")
        steps_per_epoch = math.ceil(micro / training.grad_accum)
        total = training.max_steps or training.epochs * steps_per_epoch
        return Plan(micro, steps_per_epoch, total, math.ceil(total / steps_per_epoch))

    def _warn_if_warmup_covers_the_run(self) -> None:
        """Config validation can only compare warmup with an explicit max_steps; epochs give the total here."""
        training = self.config.training
        if training.scheduler != "constant" and training.warmup_steps >= self.plan.total_steps:
            self.events.emit("warning", message=f"training.warmup_steps ({training.warmup_steps}) covers the whole "
                             f"run of {self.plan.total_steps} steps, so the learning rate never reaches training.lr; "
                             "lower training.warmup_steps or train longer")

    def _attach_tensorboard(self, resumed_step: int | None) -> None:
        """``save.tensorboard``: every event also goes to a TensorBoard sink (main process). A missing package
        stops the run here, before the model loads, on every process alike. Points an earlier attempt logged
        past the checkpoint resumed from (everything, when starting over) are purged."""
        if not self.config.save.tensorboard:
            return
        require_tensorboard()
        if not self.accelerator.is_main_process:
            return
        purge_step = resumed_step + 1 if resumed_step is not None else 0
        sink = TensorBoardSink(self.run_dir, purge_step, lambda message: self.events.emit("warning", message=message))
        previous = self.events.listener
        self.events.listener = sink if previous is None else lambda event: (previous(event), sink(event))

    # ---- processes -----------------------------------------------------------------------------------------
    def _same_start_on_every_process(self) -> None:
        """Fresh start: rank 0's adapter init everywhere; then each process draws its own noise."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import set_seed

        for param in self.params:
            torch.distributed.broadcast(param.data, src=0)
        set_seed(self.config.seed + self.accelerator.process_index)

    def _average_gradients(self) -> None:
        world = self.accelerator.num_processes
        if world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for param in self.params:
            numel = param.numel()
            param.grad = flat[offset:offset + numel].view_as(param).to(param.dtype)
            offset += numel

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value / self.accelerator.num_processes

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process only; everyone waits for it."""
        result = fn() if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return result

    # ---- stop requests --------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        local = self.stop_signalled or (self.run_dir / STOP_FILE).exists()
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor(float(local), device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # ---- checkpoints, resume, previews ------------------------------------------------------------------------
    def _checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (adapter file + training state) and return its path."""
        from accelerate.utils import gather_object

        rng_states = gather_object([ckpt.rng_state()])

        def fill(folder: Path) -> None:
            self.task.save_adapter(folder, self.position.step)
            ckpt.save_training_state(folder, position=self.position, optimizer=self.optimizer,
                                     scheduler=self.scheduler, task_state=self.task.state_dict(),
                                     rng_states=rng_states)

        target = self.run_dir / ckpt.CHECKPOINTS / f"step-{self.position.step}"
        if (target / ckpt.STATE_FILE).is_file():  # already saved at this step (periodic save, then the end)
            return target

        def write() -> None:
            ckpt.write_checkpoint(self.run_dir, self.position.step, fill, self.config.save.keep_last)
            self.events.emit("checkpoint", step=self.position.step, path=self._relative(target))

        self._on_main(write)
        return target

    def _find_resume_state(self, resume: bool, add_steps: int) -> dict[str, Any] | None:
        if self.accelerator.is_main_process:
            ckpt.remove_partial(self.run_dir)
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the run it stopped
        self.accelerator.wait_for_everyone()
        latest = ckpt.latest_checkpoint(self.run_dir)
        if not resume:
            if latest is not None:
                raise LycotrainError(f"{self.run_dir} already holds a run (last checkpoint {latest.name}); continue "
                                     f"it with `lycotrain train --resume {self.run_dir}` or choose another run_dir")
            return None
        if latest is None:
            if add_steps:
                raise LycotrainError(f"{self.run_dir} has no checkpoint to extend; train it first")
            self.events.emit("warning", message=f"no checkpoint in {self.run_dir}: starting from step 0")
            return None
        return ckpt.load_training_state(latest) | {"folder": latest}

    def _restore(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.plan.total_steps == self.position.total_steps:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # a longer (or shorter) run: the new plan's schedule, at the current step
            fast_forward(self.scheduler, self.position.step)
            self.events.emit("warning", message=f"learning-rate schedule rebuilt for {self.plan.total_steps} "
                                                f"steps (was {self.position.total_steps}) and resumed at step "
                                                f"{self.position.step}")
        rng = state["rng"]
        if len(rng) != self.accelerator.num_processes:
            self.events.emit("warning", message=f"checkpoint written by {len(rng)} process(es), resumed with "
                                                f"{self.accelerator.num_processes}: data order and noise differ")
        ckpt.set_rng_state(rng[min(self.accelerator.process_index, len(rng) - 1)])

    def _preview(self, exported: dict[str, Path] | None = None) -> None:
        def render() -> None:
            fields = self.task.preview(self.position.step, exported=exported)
            if fields:
                self.events.emit("preview", step=self.position.step, final=exported is not None, **fields)

        self._on_main(render)

    # ---- the end ----------------------------------------------------------------------------------------------
    def _end(self, status: str, outputs: dict[str, Path]) -> dict[str, Any]:
        self.events.emit("end", status=status, step=self.position.step,
                         outputs={name: self._relative(Path(path)) for name, path in outputs.items()})
        return {"status": status, "step": self.position.step, "message": "", "outputs": outputs}

    def fail(self, message: str) -> dict[str, Any]:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / ERROR_LOG, "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n{traceback.format_exc()}\n")
        self.events.emit("error", message=message)
        last = ckpt.latest_checkpoint(self.run_dir)
        outputs = {"checkpoint": last} if last else {}
        return self._end("failed", outputs) | {"message": message}

    def _relative(self, path: Path) -> str:
        return os.path.relpath(path, self.run_dir)


class _SilentEvents(EventWriter):
    """Events of a non-main process: nothing is written (the main process reports for everyone)."""

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "time": time.time(), **fields}


@contextmanager
def _stop_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM/SIGINT ask for a graceful stop; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signalled = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
