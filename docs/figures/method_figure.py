"""Draw docs/figures/cif.png with ofactl's own compression code: ``python docs/figures/method_figure.py``.

(a) one utterance's predicted alpha mixed at several lambdas, with the output frames each mix
fires; (b) the rate / lambda / frame-period relations for two mean alphas.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ofactl.model.compress import cif_plan, expected_ratio, mix_alpha, rate_to_lambda


def pseudo_phone_alpha(seg_lengths: list[int]) -> torch.Tensor:
    """An alpha_pred that fires once per segment: weight 1/len spread over each segment."""
    return torch.cat([torch.full((n,), 1.0 / n) for n in seg_lengths])


def main(out: Path) -> None:
    """Draw CIF's firing at four lambdas and the rate/lambda/frame-period curve into ``out`` (PNG)."""
    alpha = pseudo_phone_alpha([3, 5, 4, 6, 2, 5, 7, 4])  # 36 frames, 8 pseudo-phones
    S = len(alpha)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for row, lam in enumerate([0.0, 0.5, 1.0, 1.5]):
        a = mix_alpha(alpha[None], torch.tensor([lam]))[0]
        plan = cif_plan(a[None], torch.tensor([S]))
        y0 = 3 - row
        ax.bar(torch.arange(S), a * 0.8, bottom=y0, width=0.9, color=f"C{row}", alpha=0.7)
        fires = torch.nonzero(torch.diff(torch.floor(torch.cumsum(a, 0) + 1e-6), prepend=torch.zeros(1))).flatten()
        for f in fires.tolist():
            ax.plot([f + 0.45, f + 0.45], [y0, y0 + 0.9], color="k", lw=1)
        ax.text(S + 0.5, y0 + 0.3, f"lambda={lam:g}: {int(plan.lengths[0])} frames "
                f"({20 * S / int(plan.lengths[0]):.0f} ms)", va="center", fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(-1, S + 16)
    ax.set_xlabel("input frame (20 ms)")
    ax.set_title("(a) mixed alpha per 20 ms frame; ticks: a frame fires")
    lam = torch.linspace(0, 1.6, 161)
    for m in (2 / 9, 0.3):
        bx.plot(lam, 20 / expected_ratio(lam, m), label=f"mean alpha m={m:.2f}")
    for r in (1.0, 0.5, 0.25):
        lm = float(rate_to_lambda(r, 2 / 9))
        bx.plot([lm], [20 / r], "ko", ms=4)
        bx.annotate(f"rate {r:g}", (lm, 20 / r), textcoords="offset points", xytext=(5, -12), fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("lambda")
    bx.set_ylabel("mean frame period (ms) = 20 / rate")
    bx.set_title("(b) rate -> lambda with the stored mean alpha")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "cif.png")
