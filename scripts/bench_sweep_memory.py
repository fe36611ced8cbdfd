"""Peak memory of a real ImageNet-style sweep, and that a second sweep does not decode again (issue 13).

    python scripts/bench_sweep_memory.py --images 5000 --keep /tmp/bench-val

1. An ImageNet-layout folder of ``--images`` JPEGs at real-photo sizes (``scripts/bench_data.py``'s
   generator; reused when ``--keep`` already holds it).
2. A Hugging Face cache holding ``deit_small_patch16_224.fb_in1k`` as ``hf_hub_download`` leaves it,
   with random weights (this machine cannot download the real ones; memory and decoding do not
   depend on the values), read offline (``HF_HUB_OFFLINE=1``).
3. ``python -m harness run --models deit_small_patch16_224 --data imagenet:<folder>`` twice, each in
   a fresh process, into one results folder and one crop cache: the first (``--methods``, default
   ``none``) builds the cache, the second (``--then``, default ``tome``: new cells, the stored ones
   skipped) must find it and decode nothing. Peak resident memory is the largest ``ru_maxrss`` among the sweep and its
   cache-building workers (``getrusage(RUSAGE_CHILDREN)`` read after each run, in a fresh child
   shell so the two runs do not mix).

Prints one JSON line per sweep: seconds, peak RSS (MB), whether it built the cache, and the records'
statuses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HUB_ID = "timm--deit_small_patch16_224.fb_in1k"

# runs the sweep as a grandchild and prints its (and its workers') peak RSS: RUSAGE_CHILDREN of this
# small wrapper covers exactly one sweep
_WRAP = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "s": round(time.perf_counter() - t0, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                  "out": p.stdout[-4000:], "err": p.stderr[-2000:]}))
"""


def fake_hf_cache(home: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    repo = home / "hub" / f"models--{HUB_ID}"
    if (repo / "refs" / "main").exists():
        return
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.manual_seed(0)
    sd = timm.create_model("deit_small_patch16_224").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, snap / "model.safetensors")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def sweep(folder: Path, results: Path, env: dict, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "harness", "run", "--models", "deit_small_patch16_224", "--data",
            f"imagenet:{folder}", "--results", str(results), "--no-report", *extra]
    p = subprocess.run([sys.executable, "-c", _WRAP, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                       check=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    records = [json.loads(f.read_text()) for f in sorted((results / "records").glob("*.json"))]
    return {"rc": out["rc"], "seconds": out["s"], "peak_rss_mb": out["peak_rss_mb"],
            "built_cache": "building the data cache" in out["out"] + out["err"],
            "statuses": {r["method"] + "@" + r["budget"]: r["status"] for r in records},
            "n_images": sorted({r.get("n_images") for r in records}),
            **({"tail": (out["out"] + out["err"])[-1500:]} if out["rc"] else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--keep", type=Path, help="generate into (or reuse) this folder instead of a temp dir")
    p.add_argument("--methods", default="none", help="the first sweep's methods (default none)")
    p.add_argument("--then", default="tome", help="the second sweep's methods (default tome)")
    p.add_argument("--budgets", default="0.7")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args, extra = p.parse_known_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_data import generate

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    folder = args.keep or work / "val"
    if len(list(folder.glob("*/*.JPEG"))) != args.images:
        from harness.errors import HarnessError
        from harness.paths import data_root

        try:
            root = data_root()  # crops of the shared sample's real photos, when there is one
        except HarnessError:
            root = None
        generate(folder, args.images, args.workers, root)
    fake_hf_cache(work / "hf")
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1",
           "HARNESS_CACHE_DIR": str(work / "crop-cache")}
    env.pop("HF_HUB_CACHE", None)
    for i, methods in ((1, args.methods), (2, args.then)):
        res = sweep(folder, work / "results", env, ["--methods", methods, "--budgets", args.budgets, "--device", "cpu",
                                                    *extra])
        print(json.dumps({"sweep": i, "methods": methods, "images": args.images, **res}), flush=True)


if __name__ == "__main__":
    main()
