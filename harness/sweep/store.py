"""The result store: one JSON record per cell, written atomically the moment the cell ends."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# finished results: a rerun would measure the same (an off-target cell stays off target); errors and
# unsupported cells are retried (a later harness may support the model)
DONE = ("ok", "skipped", "off_target")


class ResultStore:
    """Records under ``<root>/records/<cell_id>.json``; nothing is ever rewritten in place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self._held: dict[str, int] = {}  # cell id -> the open, flocked descriptor of its lock

    def ensure_writable(self) -> None:
        """Create the directory and prove it is writable, and lockable, before any cell runs."""
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.records_dir, prefix=".probe", delete=True)
        except OSError as exc:
            raise HarnessError(f"results directory {self.records_dir} is not writable: {exc.strerror}") from None
        with probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise HarnessError(f"results directory {self.records_dir} does not support file locks (flock), which "
                                   f"keep two sweeps off one cell: {exc.strerror}") from None

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

    def write_cell(self, record: dict) -> Path:
        """Write a cell's predictions (``_predictions``, taken out of ``record``), then its record.

        The predictions first, so a record never names a missing file.
        """
        predictions = record.pop("_predictions", None)
        if predictions is not None:
            record["predictions"] = self.write_predictions(record["cell_id"], *predictions)
        return self.write(record)

    def write(self, record: dict) -> Path:
        """Write ``record`` atomically: a temporary file in the same directory, then a rename."""
        record = {"schema_version": SCHEMA_VERSION, **record}
        target = self.path(record["cell_id"])
        _atomic_write(target, lambda fh: fh.write(json.dumps(record, indent=1, sort_keys=True, default=str).encode()))
        return target

    def write_predictions(self, cell_id: str, pred, label) -> str:
        """Per-image top-1 and label (eval-set order) as ``predictions/<cell_id>.npz``, atomically.

        Returns the path relative to the results directory, which the record stores.
        """
        import numpy as np

        folder = self.root / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        small = np.int16 if max(int(pred.max(initial=0)), int(label.max(initial=0))) < 2**15 else np.int32
        _atomic_write(folder / f"{cell_id}.npz",
                      lambda fh: np.savez_compressed(fh, pred=pred.astype(small), label=label.astype(small)))
        return f"predictions/{cell_id}.npz"

    def load_all(self) -> list[dict]:
        """Every readable record, upgraded to the current schema; a corrupt file is logged and skipped."""
        records = []
        for p in sorted(self.records_dir.glob("[!.]*.json")):
            try:
                records.append(upgrade(json.loads(p.read_text())))
            except (OSError, json.JSONDecodeError, ValueError) as exc:
                log.warning("skipping unreadable record %s: %s", p, exc)
        return records

    def _lock(self, cell_id: str) -> Path:
        return self.records_dir / f"{cell_id}.lock"

    def claim(self, cell_id: str) -> bool:
        """Take the cell's lock so that one process at a time runs it; False while another holds it.

        The lock is an exclusive ``flock`` on ``<cell_id>.lock``, held until :meth:`release`: taking
        it and owning it are one step in the kernel, which also drops it the moment its holder dies
        (``kill -9`` included), so a lock is taken over exactly when its owner is gone. The file's
        text (pid, host, start) only tells a reader who holds it; nothing decides on it.
        """
        lock = self._lock(cell_id)
        for _ in range(8):  # the holder may release (unlink) between our open and our flock
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if _is_path_of(fd, lock):
                _write_owner(fd)
                self._held[cell_id] = fd
                return True
            os.close(fd)  # we locked a file already released and unlinked: try the one now at the path
        return False

    def release(self, cell_id: str) -> None:
        """Remove and unlock the cell's lock if this store holds it; another process's lock is never touched."""
        fd = self._held.pop(cell_id, None)
        if fd is None:
            return
        try:
            lock = self._lock(cell_id)
            if _is_path_of(fd, lock):  # unlinked while still locked: a waiter then sees it gone and retries
                lock.unlink()
        finally:
            os.close(fd)


def _atomic_write(target: Path, write) -> None:
    """``write(binary file)`` into a temporary file beside ``target``, fsync, then rename: a reader
    sees the old file or the whole new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    with os.fdopen(fd, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def _is_path_of(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not unlinked, not replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _write_owner(fd: int) -> None:
    """Who holds a lock, for a reader (``cat records/<cell>.lock``)."""
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner, 0)


def upgrade(record: dict) -> dict:
    """Bring a stored record to SCHEMA_VERSION; records keep loading across schema changes.

    Raises:
        ValueError: a record from a newer schema than this code knows.
    """
    version = int(record.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise ValueError(f"record schema {version} is newer than this harness ({SCHEMA_VERSION})")
    # version 1 is current; later versions add their migrations here, oldest first
    return record
