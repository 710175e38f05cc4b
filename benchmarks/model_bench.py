"""Core model figures: CIF overhead, student vs teacher throughput, rate scaling, bf16 on CPU,
and each student front end (cnn, cnn-thin, fbank) at rates 1, 0.5 and 0.25.

    python benchmarks/model_bench.py [--batch 8] [--seconds 10] [--repeats 3] [--frontends cnn,cnn-thin,fbank]

All figures are ratios measured within this one run (the machine may be noisy).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import cast, get_args

import torch
import torchaudio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import emit, timeit

from ofactl.choices import Frontend
from ofactl.model.blocks import HubertArch
from ofactl.model.student import Student, student_config
from ofactl.model.teacher import Teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frontends", default="cnn,cnn-thin,fbank", help="front ends to time ('' for none)")
    args = ap.parse_args()
    torch.manual_seed(0)
    B, N = args.batch, int(args.seconds * 16000)
    wav = torch.randn(B, N) * 0.1
    L = torch.full((B,), N)
    student = Student(student_config("base")).eval()
    teacher = torchaudio.models.hubert_base().eval()
    ours_teacher = Teacher(HubertArch())
    ours_teacher.model.load_state_dict(teacher.state_dict())
    ours_teacher.freeze()
    out: dict = {"batch": B, "seconds_per_utterance": args.seconds, "device": "cpu", "dtype": "float32"}

    with torch.inference_mode():
        feats, n = student.cnn_features(wav, L)
        out["frames_per_utterance"] = int(n[0])
        comp = student.compressor
        t_comp = timeit(lambda: comp(feats, n, rate=0.5), args.repeats)
        t_student_05 = timeit(lambda: student(wav, L, rate=0.5, with_heads=False), args.repeats)
        t_student_1 = timeit(lambda: student(wav, L, rate=1.0, with_heads=False), args.repeats)
        t_teacher = timeit(lambda: teacher.extract_features(wav), args.repeats)
        t_teacher_ours = timeit(lambda: ours_teacher(wav, L), args.repeats)
        t_cnn = timeit(lambda: student.cnn_features(wav, L), args.repeats)
        rates = rate_scaling(student, feats, n, t_cnn, args.repeats)
        cpu_bf16 = bf16_figures(student, wav, L, t_student_05, args.repeats)

    out["cif_overhead"] = {
        "compressor_s": round(t_comp, 4), "student_forward_rate0.5_s": round(t_student_05, 4),
        "ratio": round(t_comp / t_student_05, 4), "target": "<= 0.03",
    }
    out["student_vs_teacher"] = {
        "student_rate1_s": round(t_student_1, 4), "teacher_hubert_base_s": round(t_teacher, 4),
        "student_speedup": round(t_teacher / t_student_1, 3),
        "teacher_via_ofactl_s": round(t_teacher_ours, 4),
        "student_speedup_vs_ofactl_teacher": round(t_teacher_ours / t_student_1, 3),
        "student_audio_s_per_s": round(B * args.seconds / t_student_1, 2), "target": ">= 2.0",
    }
    out["rate_scaling"] = {"cnn_s": round(t_cnn, 4), "rates": rates}
    out["cpu_bf16"] = cpu_bf16
    if args.frontends:
        out["front_ends"] = front_end_figures(front_ends(args.frontends, ap), wav, L, t_teacher, args.repeats)
    emit(out)


def rate_scaling(student: Student, feats: torch.Tensor, n: torch.Tensor, t_cnn: float,
                 repeats: int) -> dict[str, dict[str, float]]:
    """The encoder's time at rates 1, 0.5 and 0.25, alone and with the CNN, relative to rate 1."""
    rates: dict[str, dict[str, float]] = {}
    for r in (1.0, 0.5, 0.25):
        t_enc = timeit(partial(student.encode, feats, n, rate=r), repeats)
        rates[str(r)] = {"encode_s": round(t_enc, 4)}
    base = rates["1.0"]["encode_s"]
    for cell in rates.values():
        cell["encode_rel_to_rate1"] = round(cell["encode_s"] / base, 3)
        cell["forward_rel_to_rate1"] = round((t_cnn + cell["encode_s"]) / (t_cnn + base), 3)
    return rates


def bf16_figures(student: Student, wav: torch.Tensor, L: torch.Tensor, t_fp32: float, repeats: int) -> dict:
    """CPU bf16 autocast at rate 0.5 against float32 (``t_fp32`` seconds): speed and the cosine of
    the last layer's frames."""
    ref = student(wav, L, rate=0.5, with_heads=False).hidden.states[:, :, -1].float()

    def bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return student(wav, L, rate=0.5, with_heads=False).hidden.states[:, :, -1]

    t_bf16 = timeit(bf16, repeats)
    cos = torch.nn.functional.cosine_similarity(bf16().float().flatten(0, 1), ref.flatten(0, 1), dim=-1)
    return {
        "fp32_s": round(t_fp32, 4), "bf16_s": round(t_bf16, 4), "speedup": round(t_fp32 / t_bf16, 3),
        "cosine_last_layer_mean": round(float(cos.mean()), 5), "cosine_last_layer_min": round(float(cos.min()), 5),
        "target": "cosine >= 0.99",
    }


def front_ends(text: str, ap: argparse.ArgumentParser) -> list[Frontend]:
    """``--frontends cnn,fbank`` as front-end names; an unknown one is refused naming the flag."""
    names = text.split(",")
    bad = [n for n in names if n not in get_args(Frontend)]
    if bad:
        ap.error(f"--frontends: unknown {', '.join(bad)}; expected some of {', '.join(get_args(Frontend))}")
    return [cast(Frontend, n) for n in names]


def front_end_figures(frontends: list[Frontend], wav: torch.Tensor, L: torch.Tensor, t_teacher: float,
                      repeats: int) -> dict:
    """Base-size student forward seconds per front end and rate (fp32 and bf16), as ratios to the
    cnn student at rate 1 and to torchaudio's hubert_base, with the analytic GMAC per second."""
    from ofactl.model.macs import student_gmacs_per_second

    out: dict = {}
    ref = None
    for fe in frontends:
        cfg = replace(student_config("base"), frontend=fe)
        s = Student(cfg).eval()
        row: dict = {}
        for r in (1.0, 0.5, 0.25):
            with torch.inference_mode():
                t32 = timeit(partial(s, wav, L, rate=r, with_heads=False), repeats)

                def bf16(s: Student = s, r: float = r) -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        s(wav, L, rate=r, with_heads=False)

                t16 = timeit(bf16, repeats)
            if fe == "cnn" and r == 1.0:
                ref = t32
            row[f"{r:g}"] = {"fp32_s": round(t32, 4), "bf16_s": round(t16, 4),
                             "gmacs_per_s": round(student_gmacs_per_second(cfg, r)["total"], 4)}
        for cell in row.values():
            if ref:
                cell["rel_to_cnn_rate1"] = round(cell["fp32_s"] / ref, 3)
            cell["speedup_vs_hubert_base"] = round(t_teacher / cell["fp32_s"], 2)
        out[fe] = row
    out["targets"] = {"rate0.25_rel_to_cnn_rate1": "<= 0.35", "rate1_speedup_vs_hubert_base": ">= 3"}
    return out


if __name__ == "__main__":
    main()
