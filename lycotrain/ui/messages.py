"""Messages in the page, and the guard that turns any failure of a handler into one.

A user never sees a traceback: a ``LycotrainError`` shows its own message (which names the field and the
fix); anything unexpected shows its type and message and the traceback goes to the app's stderr.
"""

from __future__ import annotations

import functools
import html
import sys
import traceback
from typing import Any, Callable

import gradio as gr

from lycotrain.errors import LycotrainError


def _box(kind: str, text: str, color: str, background: str) -> str:
    body = html.escape(text).replace("\n", "<br>")
    return (f"<div class='lt-message lt-{kind}' role='{'alert' if kind == 'error' else 'status'}' "
            f"style='border-left:4px solid {color};background:{background};padding:6px 10px;margin:4px 0'>"
            f"{body}</div>")


def error_html(text: str) -> str:
    return _box("error", text, "#dc2626", "#fef2f2")


def notice_html(text: str) -> str:
    return _box("notice", text, "#d97706", "#fffbeb")


def success_html(text: str) -> str:
    return _box("success", text, "#16a34a", "#f0fdf4")


def guarded(message_box: gr.components.Component, reset: dict[gr.components.Component, Any] | None = None) \
        -> Callable:
    """Wrap a handler that returns ``{component: value}``: on failure ``message_box`` shows why and the ``reset``
    outputs take their given values (e.g. an upload box emptied, so that the next upload is not refused with
    the file that just failed)."""

    def decorate(handler: Callable[..., dict]) -> Callable[..., dict]:
        @functools.wraps(handler)
        def wrapper(*args: Any) -> dict:
            try:
                return handler(*args)
            except LycotrainError as exc:
                return {**(reset or {}), message_box: error_html(str(exc))}
            except Exception as exc:  # noqa: BLE001 - the page must stay usable whatever happens
                traceback.print_exc(file=sys.stderr)
                return {**(reset or {}), message_box: error_html(f"unexpected error ({type(exc).__name__}): {exc}. "
                                                                 "The details are in the app's terminal.")}

        return wrapper

    return decorate
