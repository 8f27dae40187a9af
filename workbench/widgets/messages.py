"""The HTML the panel shows: a run's text with a note, and errors (with a traceback only for unexpected ones)."""

from __future__ import annotations

import html
import traceback

from workbench.errors import WorkbenchError


def text_html(title: str, text: str, note: str) -> str:
    return (f"<b>{html.escape(title)}</b> <small>({html.escape(note)})</small>"
            f"<pre style='white-space: pre-wrap; margin: 2px'>{html.escape(text)}</pre>")


def error_html(error: BaseException) -> str:
    """The exception's type and message; for anything but a WorkbenchError (bad input a user can fix) also the
    traceback, folded, since it helps whoever reports the bug."""
    message = f"<b>{type(error).__name__}</b>: {html.escape(str(error))}"
    if not isinstance(error, WorkbenchError):
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        message += f"<details><summary>traceback</summary><pre>{html.escape(trace)}</pre></details>"
    return f"<div class='workbench-error' style='color: #b00020'>{message}</div>"
