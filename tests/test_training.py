from __future__ import annotations

from dataclasses import replace

import pytest

from ofactl.audio import Corpus, read_corpus
from ofactl.config import load_config, save_resolved
from ofactl.distill import DistillConfig
from ofactl.errors import CheckpointError
from ofactl.training import RunTotals, check_resume, check_resume_settings, make_optimisation, record_run


def _run_with_config(tmp_path):
    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    save_resolved(cfg, "distill", tmp_path / "config.yaml")
    return cfg


def test_resume_under_the_same_settings_or_only_free_ones_passes(tmp_path):
    cfg = _run_with_config(tmp_path)
    check_resume_settings(cfg, "distill", tmp_path)
    check_resume_settings(replace(cfg, steps=cfg.steps * 2, device="cpu", num_workers=0, log_every=1), "distill",
                          tmp_path)


def test_resume_under_other_settings_names_each_with_both_values(tmp_path):
    cfg = _run_with_config(tmp_path)
    other = replace(cfg, alignment="upsample", seed=3)
    other.optim = replace(cfg.optim, lr=cfg.optim.lr / 2)
    with pytest.raises(CheckpointError) as e:
        check_resume_settings(other, "distill", tmp_path)
    msg = str(e.value)
    assert "alignment: 'compress' -> 'upsample'" in msg and "seed: 0 -> 3" in msg
    assert f"optim.lr: {cfg.optim.lr!r} -> {cfg.optim.lr / 2!r}" in msg
    assert f"-c {tmp_path / 'config.yaml'}" in msg and "--overwrite" in msg


def test_keys_only_one_side_has_are_not_compared(tmp_path):
    """A run written before a setting existed still resumes (its config.yaml lacks the key)."""
    cfg = _run_with_config(tmp_path)
    text = (tmp_path / "config.yaml").read_text().replace("  compress_weight: frame\n", "")
    (tmp_path / "config.yaml").write_text(text)
    check_resume_settings(cfg, "distill", tmp_path)


def test_a_damaged_or_foreign_record_is_one_clear_error(tmp_path):
    cfg = _run_with_config(tmp_path)
    (tmp_path / "config.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(CheckpointError, match="cannot read .*config.yaml"):
        check_resume_settings(cfg, "distill", tmp_path)
    (tmp_path / "config.yaml").write_text("pretrain:\n  steps: 3\n")
    with pytest.raises(CheckpointError, match="holds no 'distill' settings"):
        check_resume_settings(cfg, "distill", tmp_path)


def test_perturb_speed_scales_length_and_pitch():
    import numpy as np
    import torch

    from ofactl.training import perturb_speed

    t = torch.arange(16000) / 16000
    tone = torch.sin(2 * torch.pi * 200 * t)
    for factor in (0.9, 1.1):
        out = perturb_speed(tone, factor)
        assert abs(len(out) - 16000 / factor) <= 1
        spec = np.abs(np.fft.rfft(out[2000:-2000].numpy()))
        peak_hz = np.argmax(spec) * 16000 / (len(out) - 4000)
        assert abs(peak_hz - 200 * factor) < 3, (factor, peak_hz)


def test_stretch_frames_maps_each_frame_to_the_original_time():
    import numpy as np

    from ofactl.training import stretch_frames

    a = np.arange(100)
    fast, slow = stretch_frames(a, 1.25), stretch_frames(a, 0.8)
    assert len(fast) == 81 and len(slow) == 126
    assert fast[:5].tolist() == [0, 1, 3, 4, 5] and fast[-1] == 99  # frame j holds time j * 1.25
    assert slow[:6].tolist() == [0, 1, 2, 2, 3, 4] and slow[-1] == 99


def test_crop_batches_play_each_utterance_at_a_drawn_speed(synth_corpus):
    import numpy as np

    from ofactl.audio import read_corpus
    from ofactl.training import CropBatches

    utts = list(read_corpus(synth_corpus))[:4]
    aligned = {u.id: np.arange(u.n_samples_16k // 320 + 1) for u in utts}
    plain = CropBatches([(0, [0, 1, 2, 3])], utts, crop=10**7, seed=0, aligned=aligned, hop=320)[0]
    fast = CropBatches([(0, [0, 1, 2, 3])], utts, crop=10**7, seed=0, aligned=aligned, hop=320, speeds=(1.25,))[0]
    assert plain["lengths"].tolist() == [u.n_samples_16k for u in utts]
    assert [abs(n - u.n_samples_16k / 1.25) <= 1 for n, u in zip(fast["lengths"].tolist(), utts)] == [True] * 4
    row = fast["aligned"][0][fast["aligned"][0] >= 0]
    assert row[:5].tolist() == [0, 1, 3, 4, 5] and len(row) == int(fast["lengths"][0]) // 320 + 1
    mixed = CropBatches([(s, [0, 1, 2, 3]) for s in range(8)], utts, crop=10**7, seed=0, aligned=aligned, hop=320,
                        speeds=(0.9, 1.0, 1.1))
    drawn = {round(u.n_samples_16k / int(n), 1) for k in range(8) for n, u in zip(mixed[k]["lengths"], utts)}
    assert drawn == {0.9, 1.0, 1.1}
    again = mixed[3]  # seeded by step: the same batch again
    assert mixed[3]["lengths"].tolist() == again["lengths"].tolist()


def test_a_path_setting_written_another_way_is_the_same_setting(tmp_path, monkeypatch):
    """--teacher given relative at the start and absolute on --resume names one file: no change;
    another file is a change, named with both paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "t" / name).write_bytes(b"x")
    cfg = replace(load_config(DistillConfig, "distill", "distill-tiny"), teacher="t/a.safetensors")
    save_resolved(cfg, "distill", tmp_path / "config.yaml")
    check_resume_settings(replace(cfg, teacher=str(tmp_path / "t" / "a.safetensors")), "distill", tmp_path)
    check_resume_settings(replace(cfg, teacher="./t/../t/a.safetensors"), "distill", tmp_path)
    with pytest.raises(CheckpointError, match=r"teacher: 't/a.safetensors' -> 't/b.safetensors'"):
        check_resume_settings(replace(cfg, teacher="t/b.safetensors"), "distill", tmp_path)


def test_resume_on_another_corpus_is_refused_naming_both(tmp_path, synth_corpus):
    """The same utterances given another way resume; one fewer, or a changed file, is refused."""
    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    cps = read_corpus(synth_corpus)
    record_run(cfg, "distill", tmp_path, cps)
    check_resume(cfg, "distill", tmp_path, read_corpus(str(synth_corpus.resolve())))
    fewer = Corpus("fewer.tsv", cps.utterances[:-1])
    with pytest.raises(CheckpointError) as e:
        check_resume(cfg, "distill", tmp_path, fewer)
    n, hours = len(cps), round(sum(u.seconds for u in cps) / 3600, 4)
    assert f"learns from {synth_corpus} ({n} utterances, {hours} h), not from --corpus fewer.tsv ({n - 1} " in str(e.value)
    longer = Corpus("x", [replace(cps.utterances[0], n_samples=cps.utterances[0].n_samples + 1), *cps.utterances[1:]])
    with pytest.raises(CheckpointError, match="not from --corpus x"):
        check_resume(cfg, "distill", tmp_path, longer)
    (tmp_path / "corpus.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*corpus.json"):
        check_resume(cfg, "distill", tmp_path, cps)


def test_run_totals_travel_with_the_train_state_and_an_older_checkpoint_leaves_them_unknown():
    import torch

    cfg = load_config(DistillConfig, "distill", "distill-tiny")
    a = make_optimisation([torch.nn.Parameter(torch.zeros(2))], cfg, None)
    assert a.totals == RunTotals(0.0, 0.0)  # a fresh run starts from nothing
    a.totals = RunTotals(12.5, 3.0).plus(2.5, 1.0)
    state = a.state(seed=0)
    b = make_optimisation([torch.nn.Parameter(torch.zeros(2))], cfg, None)
    b.load(state)
    assert b.totals == RunTotals(15.0, 4.0)
    b.load({k: v for k, v in state.items() if k != "totals"})  # written before runs kept totals
    assert b.totals is None


def test_a_training_corpus_too_short_for_the_cnn_once_sped_up_is_one_error(write_wav, tmp_path):
    from ofactl.errors import CorpusError
    from ofactl.training import read_train_corpus

    conv = DistillConfig().student.arch.conv_layers  # receptive field 400 samples
    write_wav("long.wav", seconds=0.5)
    write_wav("s400.wav", seconds=400 / 16000)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'long.wav'}\n{tmp_path / 's400.wav'}\n")
    assert len(read_train_corpus(tmp_path / "list.txt", conv)) == 2  # 400 samples make one frame
    with pytest.raises(CorpusError, match=r"s400\.wav: too short \(400 samples .* at least 440\)"):
        read_train_corpus(tmp_path / "list.txt", conv, speeds=(0.9, 1.1))  # 1.1x: 364 samples


def test_a_training_corpus_sampled_below_8khz_is_noted(write_wav, tmp_path):
    from ofactl.progress import NullProgress
    from ofactl.training import read_train_corpus

    conv = DistillConfig().student.arch.conv_layers
    write_wav("in/wide.wav", sr=16000)
    write_wav("in/narrow.wav", sr=6000)
    progress = NullProgress()
    read_train_corpus(tmp_path / "in", conv, progress=progress)
    assert progress.messages == [f"note: 1 of 2 recording(s) are sampled below 8000 Hz (lowest 6000 Hz: "
                                 f"{tmp_path / 'in' / 'narrow.wav'}); resampled to 16000 Hz they still hold nothing "
                                 "above 3000 Hz, less than the telephone band the models were trained on"]


@pytest.mark.parametrize("command", ["distill", "pretrain"])
def test_a_one_utterance_corpus_is_one_error_not_a_run_without_training_data(command, write_wav, tmp_path):
    from typer.testing import CliRunner

    from ofactl.cli import app

    write_wav("only.wav", seconds=1.0)
    r = CliRunner().invoke(app, [command, "-c", f"{command}-tiny", "--corpus", str(tmp_path / "only.wav"),
                                 "--steps", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "the corpus has 1 usable utterance(s); training needs at least 2" in r.output


def test_a_schedule_without_training_utterances_is_an_error_not_an_endless_loop():
    from ofactl.errors import CorpusError
    from ofactl.training import schedule_from

    with pytest.raises(CorpusError, match="no training utterances"):
        schedule_from([], replace(DistillConfig(), steps=2), 0, 1, 0)


@pytest.mark.parametrize("fails", [False, True])
def test_the_loop_hands_back_its_model_with_no_ddp_wrapper_left_holding_the_process_group(tmp_path, fails):
    """Under torchrun the wrapper lives only as long as the loop, however the loop ends: a wrapper
    left to the interpreter's exit keeps the gloo group alive through teardown."""
    import gc
    from contextlib import nullcontext
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ofactl.training import Job, Setup, data_parallel

    model = torch.nn.Linear(3, 2)
    job = Job("t", model, list(model.parameters()), lambda b, g: (job.model(b).sum(), {}),  # a cycle, as real jobs have
              lambda p, s, t: None, lambda p: {}, lambda o: {})
    setup = Setup(Path(tmp_path), torch.device("cpu"), None, world=2, rank=0, local=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError) if fails else nullcontext(), data_parallel(job, setup):
            assert isinstance(job.model, DDP)
            job.step_loss(torch.randn(4, 3), torch.Generator())[0].backward()
            if fails:
                raise RuntimeError("a step failed")
        assert job.model is model
        assert not [o for o in gc.get_objects() if type(o) is DDP]  # type(): isinstance trips a torch warning
    finally:
        dist.destroy_process_group()


def test_a_process_group_a_run_did_not_leave_is_left_at_exit_once():
    import torch.distributed as dist

    from ofactl.training import _leave_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    _leave_group()
    assert not dist.is_initialized()
    _leave_group()  # a finished run already left it: nothing to do, no error
