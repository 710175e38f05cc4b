from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ofactl.errors import ModelError
from ofactl.model.blocks import cnn_lengths
from ofactl.model.frontend import FbankFrontend, frontend_channels, frontend_macs_per_second
from ofactl.model.student import Student, student_config

FRONT_ENDS = ("cnn", "cnn-thin", "fbank")


def tiny(frontend: str, **kw):
    return replace(student_config("tiny"), frontend=frontend, **kw)


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_frame_count_and_grid_are_the_cnns(frontend):
    torch.manual_seed(0)
    s = Student(tiny(frontend)).eval()
    counts = [400, 401, 559, 560, 719, 720, 721, 1000, 4321, 16000, 16001]
    for n in counts:
        x, t = s.cnn_features(torch.randn(1, n), torch.tensor([n]))
        expected = int(cnn_lengths(s.cfg.arch, torch.tensor([n]))[0])
        assert x.shape[1] == int(t[0]) == expected == (n - 400) // 320 + 1, (frontend, n)
        assert x.shape[2] == frontend_channels(s.cfg)


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_a_padded_batch_gives_each_utterance_its_own_frames(frontend):
    torch.manual_seed(0)
    s = Student(tiny(frontend)).eval()
    lengths = [16000, 9001, 4480, 720]
    wavs = [torch.randn(n) for n in lengths]
    batch = torch.zeros(len(wavs), max(lengths))
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = w
    with torch.no_grad():
        xb, nb = s.cnn_features(batch, torch.tensor(lengths))
        for i, w in enumerate(wavs):
            xi, ni = s.cnn_features(w[None], torch.tensor([len(w)]))
            assert int(nb[i]) == int(ni[0])
            assert torch.allclose(xb[i, : int(ni[0])], xi[0], atol=1e-5), (frontend, i)


def _hook_macs(module: torch.nn.Module, run) -> float:
    """Multiply-accumulates of every Conv1d and Linear, counted from their outputs by hooks."""
    total = 0.0

    def conv(m, inp, out):
        nonlocal total
        total += out.shape[0] * out.shape[2] * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0]

    hooks = [m.register_forward_hook(conv) for m in module.modules() if isinstance(m, torch.nn.Conv1d)]
    run()
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("frontend", FRONT_ENDS)
def test_mac_count_matches_a_forward_hook_count(frontend):
    s = Student(tiny(frontend)).eval()
    seconds = 20
    wav = torch.randn(1, 16000 * seconds)
    with torch.no_grad():
        counted = _hook_macs(s.cnn, lambda: s.cnn_features(wav, torch.tensor([wav.shape[1]])))
    if isinstance(s.cnn, FbankFrontend):
        frames = (wav.shape[1] - 400) // 160 + 1
        counted += frames * 201 * s.cfg.fbank_bins  # the mel projection (a matmul, not a module)
    analytic = frontend_macs_per_second(s.cfg) * seconds
    assert counted == pytest.approx(analytic, rel=0.01), frontend


def test_light_front_ends_cost_a_fraction_of_the_cnn():
    base = student_config("base")
    cnn = frontend_macs_per_second(base)
    assert frontend_macs_per_second(replace(base, frontend="fbank")) < 0.03 * cnn
    assert frontend_macs_per_second(replace(base, frontend="cnn-thin")) < 0.1 * cnn


@pytest.mark.parametrize("frontend", ("cnn-thin", "fbank"))
def test_checkpoint_round_trip(tmp_path, frontend):
    from ofactl.checkpoint import describe_checkpoint, load_student, save_student

    torch.manual_seed(0)
    s = Student(tiny(frontend, frontend_channels=24)).eval()
    p = save_student(tmp_path / "s.pt", s)
    back, _ = load_student(p)
    wav, n = torch.randn(2, 8000), torch.tensor([8000, 5000])
    with torch.no_grad():
        a = s.features(wav, n, [1.0, 0.5])
        b = back.features(wav, n, [1.0, 0.5])
    for r in a:
        assert torch.equal(a[r].states, b[r].states)
    info = describe_checkpoint(p)
    assert info["frontend"]["kind"] == frontend and info["frontend"]["channels"] == 24
    assert 0 < info["compute"]["0.25"]["frontend_share"] < 1


def test_a_light_front_end_is_not_initialised_from_the_teachers_cnn():
    from ofactl.model.teacher import load_teacher

    teacher = load_teacher("random:tiny", seed=0)
    s = Student(tiny("fbank"))
    with pytest.raises(ModelError, match="student.frontend fbank: the teacher's CNN cannot initialise it"):
        s.init_from_teacher(teacher)
    copied = s.init_from_teacher(teacher, partial=True)
    assert copied and not any(c.startswith(("cnn.", "feature_projection.")) for c in copied)
    assert any(c.startswith("transformer.layers.0.") for c in copied)
