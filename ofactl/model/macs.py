"""Analytic multiply-accumulate counts for the student (per second of 16 kHz audio).

Counted: the front end (CNN convolutions; for fbank its mel projection and convolutions, see
:func:`ofactl.model.frontend.frontend_macs_per_second`), the alpha predictor (CIF students),
projection, positional convolution, transformer layers (projections, FFN and attention, which
grows with the utterance length). Not counted: norms, activations, the prediction heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ofactl.model.blocks import HubertArch
from ofactl.runtime import SAMPLE_RATE as SR

if TYPE_CHECKING:
    from ofactl.model.student import StudentConfig


def cnn_macs_per_second(arch: HubertArch) -> float:
    """Multiply-accumulates of the CNN per audio second (its frames per second times per-frame MACs)."""
    n, c_in, macs = float(SR), 1, 0.0
    for c_out, k, s in arch.conv_layers:
        n = (n - k) / s + 1
        macs += n * c_in * c_out * k
        c_in = c_out
    return macs


def student_gmacs_per_second(cfg: StudentConfig, rate: float, utt_seconds: float = 10.0) -> dict[str, float]:
    """GMAC per audio second at ``rate`` (1 for a student without compressor), split into the
    front end (key ``cnn``) and the rest; attention assumes utterances of ``utt_seconds``."""
    from ofactl.model.frontend import frontend_channels, frontend_macs_per_second

    arch = cfg.arch
    rate = rate if cfg.compressor != "none" else 1.0
    fps_in = SR / arch.hop
    fps_out = fps_in * rate
    c, d, f = frontend_channels(cfg), arch.embed_dim, arch.ffn_dim
    cnn = frontend_macs_per_second(cfg)
    alpha = fps_in * (c * c * cfg.alpha_kernel + c) if cfg.compressor == "cif" else 0.0
    proj = fps_out * c * (d + (1 if cfg.duration_embed else 0))  # + the duration embedding (c per frame)
    pos = fps_out * d * (d // arch.pos_conv_groups) * arch.pos_conv_kernel
    t_out = fps_out * utt_seconds
    layer = fps_out * (4 * d * d + 2 * d * f + 2 * t_out * d)
    rest = alpha + proj + pos + arch.num_layers * layer
    return {"cnn": cnn / 1e9, "rest": rest / 1e9, "total": (cnn + rest) / 1e9}
