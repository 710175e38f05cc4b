"""Analytic multiply-accumulate counts for the student (per second of 16 kHz audio).

Counted: CNN convolutions, the alpha predictor (CIF students), projection, positional
convolution, transformer layers (projections, FFN and attention, which grows with the
utterance length). Not counted: norms, activations, the prediction heads.
"""

from __future__ import annotations

from ofactl.model.blocks import HubertArch
from ofactl.runtime import SAMPLE_RATE as SR


def cnn_macs_per_second(arch: HubertArch) -> float:
    """Multiply-accumulates of the CNN per audio second (its frames per second times per-frame MACs)."""
    n, c_in, macs = float(SR), 1, 0.0
    for c_out, k, s in arch.conv_layers:
        n = (n - k) / s + 1
        macs += n * c_in * c_out * k
        c_in = c_out
    return macs


def student_gmacs_per_second(arch: HubertArch, rate: float, compressor: str = "cif",
                             alpha_kernel: int = 5, utt_seconds: float = 10.0) -> dict[str, float]:
    """GMAC per audio second at ``rate``, split into CNN and the rest; attention assumes
    utterances of ``utt_seconds``."""
    fps_in = SR / arch.hop
    fps_out = fps_in * rate
    c, d, f = arch.cnn_dim, arch.embed_dim, arch.ffn_dim
    cnn = cnn_macs_per_second(arch)
    alpha = fps_in * (c * c * alpha_kernel + c) if compressor == "cif" else 0.0
    proj = fps_out * c * d
    pos = fps_out * d * (d // arch.pos_conv_groups) * arch.pos_conv_kernel
    t_out = fps_out * utt_seconds
    layer = fps_out * (4 * d * d + 2 * d * f + 2 * t_out * d)
    rest = alpha + proj + pos + arch.num_layers * layer
    return {"cnn": cnn / 1e9, "rest": rest / 1e9, "total": (cnn + rest) / 1e9}
