"""The results store: one JSON record per finished cell, named by the cell's key, in a directory or any fsspec URL
(s3://bucket/sweeps/x, gs://..., memory://...), so workers on a cluster and a laptop read the same store.

    <store>/sweep.json          what the store holds: its format and the sweep settings it was made with
    <store>/cells/<key>.json    one cell: status (done / failed), measures, reply, error, timing, worker

A record is written whole or not at all: on a local disk to a temporary name, then renamed over (atomic on POSIX);
on an object store by one put. A crash therefore never leaves a half cell, and re-running a sweep skips every
key that has a record. Cells hold a few numbers each, so JSON (readable, diffable) beats a netCDF per cell; the
sweep's result is assembled into one xarray.Dataset from the records.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from workbench.sweeps.grid import FORMAT, Grid, SweepError


class Store:
    def __init__(self, url: str | os.PathLike):
        import fsspec

        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # -- what the store was made for ---------------------------------------------------------------------------
    def bind(self, grid: Grid) -> None:
        """Claim the store for this sweep, or refuse if it holds another sweep's results. A store stays bound to
        the settings it was made with; the axes may grow (a resumed sweep with more budgets reuses every cell)."""
        header = self.header()
        mine = {"format": FORMAT, "settings": grid.settings}
        if header is None:
            if self.fs.exists(self._path("cells")) and self.fs.ls(self._path("cells")):
                raise SweepError(f"{self.url} holds cell records but no sweep.json; it was not written by wb.sweep "
                                 "(or is damaged): use another store")
            self._put("sweep.json", {**mine, "definition": grid.describe()})
            return
        theirs = {"format": header.get("format"), "settings": header.get("settings") or {}}
        if theirs != mine:
            differ = [f"{k}: store {theirs['settings'].get(k)!r}, this sweep {v!r}"
                      for k, v in grid.settings.items() if theirs["settings"].get(k) != v]
            if theirs["format"] != FORMAT:
                differ.insert(0, f"format: store {theirs['format']!r}, this sweep {FORMAT}")
            raise SweepError(f"{self.url} holds results of an incompatible sweep ({'; '.join(differ)}); nothing "
                             "was written: use another store, or the settings it was made with")
        if header.get("definition") != grid.describe():
            self._put("sweep.json", {**mine, "definition": grid.describe()})

    def header(self) -> dict[str, Any] | None:
        path = self._path("sweep.json")
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except ValueError:
            raise SweepError(f"{self.url}/sweep.json is not JSON; this is not a sweep store") from None

    # -- cells -------------------------------------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """Every finished cell's record, by key."""
        folder = self._path("cells")
        if not self.fs.exists(folder):
            return {}
        paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        found = self.fs.cat(paths) if paths else {}
        records = {}
        for path, data in found.items():
            record = json.loads(data)
            records[record["key"]] = record
        return records

    def write(self, record: dict[str, Any]) -> None:
        self._put(f"cells/{record['key']}.json", record)

    def _put(self, name: str, content: dict[str, Any]) -> None:
        data = json.dumps(content, indent=1, default=_plain).encode()
        path = self._path(name)
        if self.local:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            staging = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        else:
            self.fs.pipe_file(path, data)


def _plain(value: Any) -> Any:
    """numpy scalars and other numbers as plain JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
