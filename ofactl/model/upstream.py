"""s3prl-style upstream: an OFA student at one fixed rate behind the interface s3prl expects.

    up = OfaUpstream.from_checkpoint("student.pt", rate=0.5)
    out = up([wav1, wav2])                  # list of (samples,) 16 kHz tensors
    out["hidden_states"]                    # L tensors (B, T', D), padded
    up.get_downsample_rates("hidden_states")  # 640 samples per frame at rate 0.5
    hs, lens = up.forward_padded(wavs, wavs_len)  # S3PRLUpstream-style (all_hs, all_lens)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.errors import ModelError
from ofactl.model.compress import length_mask
from ofactl.model.student import Student


class OfaUpstream(nn.Module):
    """Wraps a student at ``rate``; exact mode gives round(rate * T) frames per utterance."""

    def __init__(self, student: Student, rate: float = 1.0, exact: bool = True) -> None:
        super().__init__()
        if not 0 < rate <= 1:
            raise ModelError(f"rate must be in (0, 1], got {rate}")
        self.student = student.eval()
        self.rate = float(rate)
        self.exact = exact

    @classmethod
    def from_checkpoint(cls, path: str | Path, rate: float = 1.0, device: str = "cpu") -> OfaUpstream:
        """Load a ``student.pt`` for s3prl-style use at ``rate`` on ``device``."""
        from ofactl.checkpoint import load_student

        student, _ = load_student(Path(path), device)
        return cls(student, rate)

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Average input samples per output frame, as the integer s3prl requires."""
        return int(round(self.student.cfg.arch.hop / self.rate))

    @torch.no_grad()
    def forward_padded(self, wavs: Tensor, wavs_len: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(B, N) padded waveforms + (B,) lengths -> (per-layer (B, T', D), per-layer lengths)."""
        h = self.student.features(wavs, wavs_len, [self.rate], exact=self.exact)[self.rate]
        states = [h.states[:, :, i] for i in range(h.states.shape[2])]
        return states, [h.lengths] * len(states)

    def forward(self, wavs: list[Tensor]) -> dict[str, object]:
        """s3prl's upstream call: a list of (N,) 16 kHz waveforms -> ``{'hidden_states': [...]}``,
        each (B, T', D) at the chosen rate.
        """
        if not wavs:
            raise ModelError("no waveforms given")
        lengths = torch.tensor([len(w) for w in wavs], device=wavs[0].device)
        padded = torch.nn.utils.rnn.pad_sequence([w.reshape(-1) for w in wavs], batch_first=True)
        states, lens = self.forward_padded(padded, lengths)
        mask = length_mask(lens[0], states[0].shape[1])[..., None]
        states = [s * mask for s in states]
        return {"hidden_states": states, "last_hidden_state": states[-1], "hidden_states_lengths": lens[0]}
