"""One writer per cell: the store's lock, raced by real processes through the store's own API."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.sweep.store import ResultStore

# A sweep in miniature: each racer walks the same cells in the same order through ResultStore's
# claim / is_done / write / release, computing (sleeping) inside the lock and counting each computation.
RACER = r"""
import os, sys, time
from pathlib import Path
from harness.sweep.store import ResultStore
root, counter, go, cells = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
store = ResultStore(root)
store.ensure_writable()
print("ready", flush=True)
while not go.exists():  # start together: the race is the point
    time.sleep(0.001)
for i in range(cells):
    cid = f"cell{i:02d}"
    if store.is_done(cid) or not store.claim(cid):
        continue
    try:
        if store.is_done(cid):
            continue
        print("claimed", cid, flush=True)
        time.sleep(0.15)
        with open(counter, "a") as fh:
            fh.write(f"{cid} {os.getpid()}\n")
        store.write({"cell_id": cid, "status": "ok", "pid": os.getpid()})
    finally:
        store.release(cid)
print("finished", flush=True)
"""

CELLS = 12


def _racers(tmp_path, n=4):
    go = tmp_path / f"go{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "results"), str(tmp_path / "counter"),
                               str(go), str(CELLS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n)]
    for p in procs:  # every racer imported and waiting: then they start together
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    return procs


def _finish(procs):
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _computed(tmp_path) -> Counter:
    return Counter(line.split()[0] for line in (tmp_path / "counter").read_text().splitlines())


@pytest.mark.parametrize("round_", range(3))  # a race lost once in a while is still lost: run it thrice
def test_four_racers_compute_each_cell_once(tmp_path, round_):
    _finish(_racers(tmp_path))
    records = ResultStore(tmp_path / "results").load_all()
    assert sorted(r["cell_id"] for r in records) == [f"cell{i:02d}" for i in range(CELLS)]
    computed = _computed(tmp_path)
    assert len(computed) == CELLS and set(computed.values()) == {1}, computed
    assert not list((tmp_path / "results" / "records").glob("*.lock"))


def test_a_racer_killed_mid_cell_then_the_sweep_restarted(tmp_path):
    procs = _racers(tmp_path)
    victim = procs[0]
    line = victim.stdout.readline()  # it holds a cell's lock and is computing it
    assert line.startswith("claimed"), line
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    _finish(procs[1:])
    _finish(_racers(tmp_path))  # the sweep started again
    records = ResultStore(tmp_path / "results").load_all()
    assert len(records) == CELLS
    computed = _computed(tmp_path)
    assert len(computed) == CELLS and set(computed.values()) == {1}, computed
    assert not list((tmp_path / "results" / "records").glob("*.lock"))


HOLDER = r"""
import sys, time
from pathlib import Path
from harness.sweep.store import ResultStore
store = ResultStore(Path(sys.argv[1]))
store.ensure_writable()
assert store.claim(sys.argv[2])
if sys.argv[3] == "blank":  # the moment between a lock's creation and its owner's text
    (store.records_dir / (sys.argv[2] + ".lock")).write_text("")
print("holding", flush=True)
time.sleep(120)
"""


def _holder(root: Path, cell_id: str, blank: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), cell_id, "blank" if blank else "owner"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_live_holder_keeps_its_lock_until_it_dies(tmp_path):
    store = ResultStore(tmp_path)
    holder = _holder(tmp_path, "c1")
    try:
        owner = json.loads((store.records_dir / "c1.lock").read_text())
        assert owner["pid"] == holder.pid and owner["host"] and owner["since"] > 0
        assert not store.claim("c1")
    finally:
        holder.kill()
        holder.wait()
    assert store.claim("c1")  # its owner is gone: taken over
    assert json.loads((store.records_dir / "c1.lock").read_text())["pid"] == os.getpid()
    store.release("c1")
    assert not (store.records_dir / "c1.lock").exists()


def test_a_lock_without_owner_text_is_not_taken_from_a_live_holder(tmp_path):
    holder = _holder(tmp_path, "c1", blank=True)
    try:
        assert (tmp_path / "records" / "c1.lock").read_text() == ""
        assert not ResultStore(tmp_path).claim("c1")
    finally:
        holder.kill()
        holder.wait()


def test_release_removes_only_ones_own_lock(tmp_path):
    mine, other = ResultStore(tmp_path), ResultStore(tmp_path)
    mine.ensure_writable()
    assert mine.claim("c1")
    other.release("c1")  # never claimed by it: nothing happens
    assert (mine.records_dir / "c1.lock").exists()
    assert not other.claim("c1")
    mine.release("c1")
    assert not (mine.records_dir / "c1.lock").exists() and other.claim("c1")
    other.release("c1")


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    """Whatever its text says (an earlier harness's owner record, or nothing): no process holds it."""
    store = ResultStore(tmp_path)
    store.ensure_writable()
    (store.records_dir / "c1.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": time.time()}))
    (store.records_dir / "c2.lock").write_text("")
    assert store.claim("c1") and store.claim("c2")
