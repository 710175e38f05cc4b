"""Crash safety of ``extract``: SIGKILL at random moments (some aimed at group creation), rerun,
and compare the store with a clean run, bit for bit.

    python benchmarks/store_chaos.py [--trials 20] [--aimed 5] [--corpus TSV]

Uses a synthetic corpus (``ofactl synth``, small) unless ``--corpus`` is given, and a tiny
student widened so a run lasts a few seconds. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit

from ofactl.checkpoint import save_student
from ofactl.extract import ExtractConfig, run_extract
from ofactl.model.student import Student, student_config
from ofactl.storage import open_store

RATES = (1.0, 0.5, 0.33)
CFG: dict[str, Any] = dict(rates=RATES, num_workers=0, block_utts=8, chunk_frames=64, batch_seconds=4.0, dtype="float16")
RUN = """
import sys
from ofactl.extract import ExtractConfig, run_extract
cfg = ExtractConfig(**{cfg})
run_extract(cfg, sys.argv[1], sys.argv[2], sys.argv[3])
"""


def features(store: Path) -> dict[float, dict[str, np.ndarray]]:
    s = open_store(store)
    return {r: s.group(r).load_all() for r in RATES}


def same(a: dict, b: dict) -> bool:
    return all(a[r].keys() == b[r].keys() and all(np.array_equal(a[r][k], b[r][k]) for k in a[r]) for r in RATES)


def phase(store: Path) -> str:
    """What the killed run had got to."""
    if not store.exists():
        return "before the store"
    if list(store.glob(".creating-*")):
        return "creating a group"
    groups = [p for p in store.glob("rate=*") if p.is_dir()]
    if len(groups) < len(RATES):
        return "between groups"
    try:
        done = sum(int(open_store(store).group(r).done.sum()) for r in RATES)
    except Exception:
        return "groups created"
    return "extracting" if done else "groups created"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--aimed", type=int, default=5, help="trials killed as soon as a group is being created")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ofactl-chaos-"))
    corpus = args.corpus
    if corpus is None:
        from ofactl.synth import SynthConfig, run_synth

        corpus = str(run_synth(SynthConfig(seed=3, n_speakers=8, keyword_takes=1, n_sentences=8,
                                           sentences_per_speaker=3), work / "corpus").manifest)
    torch.manual_seed(0)
    scfg = student_config("tiny")
    scfg.arch.conv_layers = tuple((256, k, s) for _, k, s in scfg.arch.conv_layers)
    ckpt = save_student(work / "student.pt", Student(scfg))
    cfg = ExtractConfig(**CFG)
    t0 = time.perf_counter()
    script = RUN.format(cfg=repr(CFG))
    subprocess.run([sys.executable, "-c", script, str(ckpt), corpus, str(work / "clean.zarr")], check=True)
    clean_s = time.perf_counter() - t0
    clean = features(work / "clean.zarr")
    trials: list[dict[str, Any]] = []
    for k in range(args.trials):
        store = work / f"t{k}.zarr"
        proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt), corpus, str(store)])
        t_start = time.perf_counter()
        if k < args.aimed:
            while proc.poll() is None and not list(store.glob(".creating-*")) if store.exists() else proc.poll() is None:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, clean_s))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at = phase(store) if proc.returncode == -signal.SIGKILL else "finished before the kill"
        run_extract(cfg, ckpt, corpus, store)
        trials.append({"kill_after_s": round(time.perf_counter() - t_start, 3), "phase": at,
                       "identical": same(features(store), clean)})
        print(json.dumps(trials[-1]), file=sys.stderr)
    emit({"benchmark": "store_chaos", "clean_run_s": round(clean_s, 2), "trials": len(trials),
          "identical": sum(t["identical"] for t in trials), "killed": sum(t["phase"] != "finished before the kill"
                                                                         for t in trials),
          "phases": {p: sum(t["phase"] == p for t in trials) for p in sorted({t["phase"] for t in trials})},
          "details": trials})


if __name__ == "__main__":
    main()
