"""One lock between the live plots' updates and panel's handling of the browser's messages.

A bokeh document is not thread safe. In a notebook, panel applies each message the browser sends back (axis
ranges, plot sizes, echoes of data) between `doc.hold()` and `doc.unhold()`, and `unhold()` hands every change
still held, one that another thread has made but not pushed yet, to the document's callbacks instead of the comm:
the browser never receives it. The panel generates and redraws in a background thread, and ipykernel handles the
plots' comm messages on a thread of its own (a subshell's, under JupyterLab), so now and then a redraw was lost:
a live curve missed rows or a plot stayed on an earlier step. Both sides take this lock, so a message from the
browser is never applied in the middle of a redraw.
"""

from __future__ import annotations

import threading


class PlotLock:
    """A lock for the live plots' stream sends (`with lock:`) that panel also takes while it applies a browser
    message to the guarded plots."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def guard(self, view) -> int:
        """After `view` (a panel object) was displayed: apply the browser's messages for it under this lock.
        Returns how many of its comms are guarded (0 outside a notebook, where nothing sends messages)."""
        guarded = 0
        for _, client_comm in getattr(view, "_comms", {}).values():  # panel keeps (comm, client comm) per display
            handle = getattr(client_comm, "_on_msg", None)  # pyviz_comms calls it with each browser message
            if handle is None:
                continue
            if not getattr(handle, "guarded_by_workbench", False):
                client_comm._on_msg = self._locked(handle)
            guarded += 1
        return guarded

    def _locked(self, handle):
        def locked(message):
            with self._lock:
                handle(message)

        locked.guarded_by_workbench = True
        return locked
