"""Memory for long recordings: peak resident memory of ``ofactl extract`` on a 20-minute clip
with the base student at rate 0.5 (windowed), against a 1-second clip, and how far windowed
features are from whole-utterance ones on a clip that fits both ways.

    python benchmarks/long_audio_bench.py [--minutes 20] [--device cpu]

Each extraction runs in its own process (peak RSS from getrusage). Random weights: memory and
lengths do not depend on training; the windowed/whole gap does a little (attention spread).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit

from ofactl.checkpoint import save_student
from ofactl.model.student import Student, student_config

RUN = """
import json, resource, sys, time
from ofactl.extract import ExtractConfig, run_extract
cfg = ExtractConfig(rates=(0.5,), num_workers=0, device=sys.argv[4], long_window_s=float(sys.argv[5]))
t0 = time.perf_counter()
res = run_extract(cfg, sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "frames": res.groups[0].frames,
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
"""


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise bursts under a slow envelope (what the model sees matters little here)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    env = np.repeat(rng.uniform(0.05, 0.5, size=n // 1600 + 1), 1600)[:n]
    return (rng.normal(size=n) * env * 0.3).astype(np.float32)


def extract(ckpt: Path, wav: Path, out: Path, device: str, window: float) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, str(ckpt), str(wav), str(out), device, str(window)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ofactl-long-"))
    torch.manual_seed(0)
    ckpt = save_student(work / "base.pt", Student(student_config("base")))
    clips = {"1s": 1.0, "long": args.minutes * 60, "90s": 90.0}
    for name, sec in clips.items():
        sf.write(str(work / f"{name}.wav"), speechlike(sec, 1), 16000)
    out = {"benchmark": "long_audio", "student": "base (random weights)", "rate": 0.5, "minutes": args.minutes}
    out["one_second"] = extract(ckpt, work / "1s.wav", work / "a.zarr", args.device, 60.0)
    out["long_windowed"] = extract(ckpt, work / "long.wav", work / "b.zarr", args.device, 60.0)
    # a 90 s clip both ways: windows of 60 s (+ 8 s context) against the whole clip
    extract(ckpt, work / "90s.wav", work / "w.zarr", args.device, 60.0)
    extract(ckpt, work / "90s.wav", work / "h.zarr", args.device, 1000.0)
    from ofactl.storage import open_store

    w = open_store(work / "w.zarr").group(0.5)["90s"].astype(np.float32)
    h = open_store(work / "h.zarr").group(0.5)["90s"].astype(np.float32)
    out["windowed_vs_whole_90s"] = {
        "frames": [len(w), len(h)],
        "relative_l2_per_layer": [round(float(np.linalg.norm(w[:, k] - h[:, k]) / np.linalg.norm(h[:, k])), 5)
                                  for k in range(h.shape[1])],
    }
    out["peak_ratio_long_vs_1s"] = round(out["long_windowed"]["peak_rss_gb"] / out["one_second"]["peak_rss_gb"], 2)
    emit(out)


if __name__ == "__main__":
    time.sleep(0)
    main()
