from __future__ import annotations

import torch

from ofactl.checkpoint import save_student
from ofactl.model.student import Student, student_config
from ofactl.model.upstream import OfaUpstream


def test_s3prl_interface(tmp_path):
    torch.manual_seed(0)
    s = Student(student_config("tiny"))
    p = save_student(tmp_path / "s.pt", s)
    up = OfaUpstream.from_checkpoint(p, rate=0.5)
    assert up.get_downsample_rates("hidden_states") == 640
    wavs = [torch.randn(16000), torch.randn(9600)]
    out = up(wavs)
    hs = out["hidden_states"]
    assert len(hs) == 3 and out["last_hidden_state"] is hs[-1]
    assert out["hidden_states_lengths"].tolist() == [25, 15]
    # s3prl's Featurizer tolerates < 5 frames between len // stride and the real length
    for w, n in zip(wavs, out["hidden_states_lengths"].tolist()):
        assert abs(len(w) // up.get_downsample_rates() - n) < 5
    single = up([wavs[1]])["hidden_states"][-1]
    assert torch.allclose(single[0], hs[-1][1, :15], atol=2e-5)
    assert torch.all(hs[0][1, 15:] == 0)
