"""The live view of a run, shared by the image and text tabs: progress, loss plot, previews, messages, downloads.

The page polls with a ``gr.Timer``; every tick reads the run's new events (incrementally, see ``jobs.py``)
and re-renders only the parts that changed, so a reload or a second browser simply starts polling the same
run folder. The session remembers which run it shows; a fresh page shows the running job of its task.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd  # gradio imports pandas already; LinePlot takes a DataFrame

from lycotrain.jobs import JobManager, JobRecord, RunView
from lycotrain.ui.messages import error_html, notice_html

MAX_PLOT_POINTS = 2000
NOT_DOWNLOADS = ("checkpoint",)  # the training state is for resuming here, not a file to hand out
# the image pre-flight report's problem lists (diffusion/lint.py), as the live view counts them
PREFLIGHT_PROBLEMS = (("missing_captions", "image(s) without a caption file (trained with an empty caption or the "
                                           "trigger word)"),
                      ("empty_captions", "empty caption file(s)"),
                      ("orphan_captions", "caption file(s) that no image reads"),
                      ("unreadable", "unreadable image(s), skipped"),
                      ("below_smallest_bucket", "image(s) smaller than their bucket (upscaled, blurry)"),
                      ("starved_buckets", "bucket(s) with fewer images than the batch size"),
                      ("duplicates", "group(s) of identical images"))
STATE_WORDS = {"queued": "queued — waiting for the running job to end", "running": "running",
               "finished": "finished", "stopped": "stopped (checkpoint saved)", "failed": "failed",
               "cancelled": "cancelled before it started"}


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_html(record: JobRecord | None, view: RunView) -> str:
    """A progress bar with step, it/s, ETA and the latest loss (plain HTML; the test reads its text)."""
    if record is None:
        return "<div class='lt-progress-text'>No run yet. Set up a run and press Start.</div>"
    total = view.total_steps or 0
    fraction = min(1.0, view.step / total) if total else 0.0
    if record.state == "finished":
        fraction = 1.0
    parts = [f"<b>{html.escape(record.name)}</b> — {STATE_WORDS.get(record.state, record.state)}",
             f"step {view.step} / {total or '?'}"]
    if view.it_s:
        parts.append(f"{view.it_s:.2f} it/s")
    if record.state == "running":
        parts.append(f"ETA {format_duration(view.eta_s)}")
    if view.loss is not None:
        parts.append(f"loss {view.loss:.4g}")
    bar_color = {"failed": "#dc2626", "stopped": "#d97706"}.get(record.state, "#2563eb")
    return (f"<div class='lt-progress' data-step='{view.step}' data-total='{total}' data-state='{record.state}'>"
            f"<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div style='width:{fraction * 100:.1f}%;background:{bar_color};height:100%'></div></div>"
            f"<div class='lt-progress-text' style='margin-top:4px'>{' · '.join(parts)}</div></div>")


def run_label(record: JobRecord) -> str:
    """The run picker's label: the name, the state and when it was queued (from its folder's stamp), so that two
    runs of the same name (the same settings, a re-run) can be told apart."""
    stamp = re.match(r"(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)(\d\d)", record.id)
    when = f" · {'-'.join(stamp.groups()[:3])} {':'.join(stamp.groups()[3:])}" if stamp else f" · {record.id}"
    return f"{record.name} — {record.state}{when}"


def preflight_summary(report: dict[str, Any] | None) -> str:
    """One line on the dataset problems the run's pre-flight report found (they are not warning events, and a
    run whose captions were all missing trained on empty captions without a word in the page)."""
    counts = [(len(report.get(key) or []), words) for key, words in PREFLIGHT_PROBLEMS] if report else []
    found = [f"{count} {words}" for count, words in counts if count]
    if not found:
        return ""
    return ("Dataset pre-flight: " + "; ".join(found) + ". “Check dataset (pre-flight report)” lists them.")


def messages_html(record: JobRecord | None, view: RunView) -> str:
    """Warnings and errors of the run (the engine's user-facing messages; tracebacks stay in error.log)."""
    if record is None:
        return ""
    parts = [error_html(message) for message in view.errors]
    if record.error and record.error not in view.errors:
        parts.append(error_html(record.error))
    if summary := preflight_summary(view.preflight):
        parts.append(notice_html(summary))
    parts += [notice_html(message) for message in view.warnings[-20:]]
    return "".join(parts)


def loss_frame(view: RunView) -> pd.DataFrame:
    points = view.losses
    if len(points) > MAX_PLOT_POINTS:  # keep the plot light: every k-th point, and always the latest
        stride = len(points) // MAX_PLOT_POINTS + 1
        points = points[::stride] + [points[-1]]
    return pd.DataFrame({"step": [s for s, _ in points], "loss": [v for _, v in points]})


def preview_items(view: RunView) -> list[tuple[str, str]]:
    """Preview images, newest first, captioned with their step."""
    return [(path, f"step {step}") for step, path in reversed(view.previews) if Path(path).is_file()]


def text_previews_markdown(view: RunView) -> str:
    if not view.texts:
        return "*No sample generations yet.*"
    rows = [f"| {step} | {_cell(prompt)} | {_cell(output)} |" for step, prompt, output in reversed(view.texts[-30:])]
    return "| step | prompt | output |\n|---|---|---|\n" + "\n".join(rows)


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", " ")[:400]


def download_files(view: RunView) -> list[str]:
    """The run's outputs as files (a PEFT adapter folder is listed file by file; the checkpoint is not)."""
    files: list[str] = []
    for name, path in view.outputs.items():
        if name in NOT_DOWNLOADS:
            continue
        target = Path(path)
        if target.is_dir():
            files += sorted(str(p) for p in target.rglob("*") if p.is_file())
        elif target.is_file():
            files.append(str(target))
    return list(dict.fromkeys(files))


def details_markdown(view: RunView) -> str:
    """Results beyond the loss: AdaLoRA's final rank allocation, and extra fields of the end event."""
    lines = []
    if view.ranks:
        total = sum(view.ranks.values())
        lines.append(f"**AdaLoRA rank allocation** (fixed at step {view.ranks_step}; total rank {total}"
                     f"{f', budget {view.rank_budget}' if view.rank_budget is not None else ''})\n\n"
                     "| module | rank |\n|---|---|\n" + "\n".join(f"| `{k}` | {v} |" for k, v in view.ranks.items()))
    lines += [f"**{key.replace('_', ' ')}**: `{json.dumps(value, default=str)[:2000]}`"
              for key, value in view.extra.items()]
    return "\n\n".join(lines)


class LiveView:
    """The components of the live view and the timer that feeds them; build inside a ``gr.Blocks``."""

    def __init__(self, manager: JobManager, task: str, poll_s: float = 1.0) -> None:
        self.manager, self.task = manager, task
        self.job_id = gr.State(None)
        self.rendered = gr.State({})
        with gr.Row():
            self.run_picker = gr.Dropdown(label="run shown", choices=[], value=None, scale=4,
                                          elem_id=f"{task}-run-picker", info="the newest running run by default")
            self.stop_button = gr.Button("Stop", variant="stop", scale=1, elem_id=f"{task}-stop")
        self.progress = gr.HTML(progress_html(None, RunView()), elem_id=f"{task}-progress")
        self.messages = gr.HTML("", elem_id=f"{task}-run-messages")
        self.plot = gr.LinePlot(x="step", y="loss", label="loss", elem_id=f"{task}-loss-plot", height=260)
        if task == "image":  # the column's full width: beside the plot, three ~100 px tiles overflowed it
            self.previews = gr.Gallery(label="previews (newest first)", columns=3, height=320,
                                       elem_id=f"{task}-previews", interactive=False)
        else:
            self.previews = gr.Markdown(text_previews_markdown(RunView()), elem_id=f"{task}-previews")
        self.details = gr.Markdown("", elem_id=f"{task}-run-details")
        self.downloads = gr.File(label="downloads", file_count="multiple", interactive=False,
                                 elem_id=f"{task}-downloads")
        self.timer = gr.Timer(poll_s)
        outputs = [self.job_id, self.rendered, self.run_picker, self.progress, self.messages, self.plot,
                   self.previews, self.details, self.downloads]
        self.timer.tick(self.refresh, [self.job_id, self.rendered], outputs, show_progress="hidden",
                        concurrency_limit=None, queue=False)
        self.run_picker.input(lambda job_id: (job_id, {}), [self.run_picker], [self.job_id, self.rendered],
                              queue=False)
        self.stop_button.click(self.stop, [self.job_id], [self.messages], queue=False)

    def show(self, job_id: str | None) -> tuple[str | None, dict]:
        """Outputs for handlers that start a run: show it and re-render everything."""
        return job_id, {}

    def refresh(self, job_id: str | None, rendered: dict[str, Any]) -> tuple:
        """One poll: the chosen run (or the current one of this tab's task), re-rendering what changed."""
        record = self.manager.get(job_id) if job_id else None
        if record is None:
            record = self.manager.current(self.task)
        view = self.manager.view(record.id) if record else RunView()
        records = self.manager.list(self.task)
        new = {"job": record.id if record else None, "runs": [(r.id, r.state) for r in records[:50]],
               "losses": len(view.losses), "previews": (len(view.previews), len(view.texts)),
               "outputs": sorted(view.outputs), "state": record.state if record else None, "ranks": len(view.ranks),
               "messages": (len(view.warnings), len(view.errors), record.error if record else None,
                            view.preflight is not None)}
        changed = {key for key in new if rendered.get(key) != new[key] or rendered.get("job") != new["job"]}
        labels = [run_label(r) for r in records[:50]]
        choices = [(label if labels.count(label) == 1 else f"{label} ({r.id})", r.id)  # same second: the folder
                   for label, r in zip(labels, records)]
        picker = gr.update(choices=choices, value=new["job"]) if changed & {"runs", "job"} else gr.skip()
        plot = loss_frame(view) if "losses" in changed else gr.skip()
        if "previews" in changed:
            previews = preview_items(view) if self.task == "image" else text_previews_markdown(view)
        else:
            previews = gr.skip()
        downloads = (download_files(view) or None) if changed & {"outputs", "state"} else gr.skip()
        details = details_markdown(view) if changed & {"outputs", "state", "ranks"} else gr.skip()
        messages = messages_html(record, view) if changed & {"messages", "state"} else gr.skip()
        return (new["job"], new, picker, progress_html(record, view), messages, plot, previews, details,
                downloads)

    def stop(self, job_id: str | None) -> str:
        record = self.manager.get(job_id) if job_id else self.manager.current(self.task)
        if record is None or not record.live:
            return notice_html("No running or queued run to stop.")
        record = self.manager.stop(record.id)
        if record.state == "cancelled":
            return notice_html(f"{record.name}: removed from the queue.")
        return notice_html(f"{record.name}: stopping — the run saves a checkpoint, then ends.")
