"""The result store: one JSON record per cell, written atomically the moment the cell ends."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DONE = ("ok", "skipped")


class ResultStore:
    """Records under ``<root>/records/<cell_id>.json``; nothing is ever rewritten in place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.records_dir = self.root / "records"

    def ensure_writable(self) -> None:
        """Create the directory and prove it is writable before any cell runs."""
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.records_dir, prefix=".probe", delete=True):
                pass
        except OSError as exc:
            raise HarnessError(f"results directory {self.records_dir} is not writable: {exc.strerror}") from None

    def path(self, cell_id: str) -> Path:
        return self.records_dir / f"{cell_id}.json"

    def get(self, cell_id: str):
        """The stored record of ``cell_id``, or None (an unreadable file counts as absent)."""
        try:
            return json.loads(self.path(cell_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, cell_id: str) -> bool:
        """A cell is done when it ended ok or as a recorded skip; errors are retried."""
        rec = self.get(cell_id)
        return rec is not None and rec.get("status") in DONE

    def write(self, record: dict) -> Path:
        """Write ``record`` atomically: a temporary file in the same directory, then a rename."""
        record = {"schema_version": SCHEMA_VERSION, **record}
        target = self.path(record["cell_id"])
        fd, tmp = tempfile.mkstemp(dir=self.records_dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return target

    def load_all(self) -> list[dict]:
        """Every readable record; a corrupt file is logged and skipped, never deleted."""
        records = []
        for p in sorted(self.records_dir.glob("*.json")):
            try:
                records.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("skipping unreadable record %s: %s", p, exc)
        return records
