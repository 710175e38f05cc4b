from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ofactl.audio import Corpus, Utterance
from ofactl.probe import ProbeConfig, build_task, train_probe, train_probes
from ofactl.probe.metrics import ctc_greedy, error_rate, words
from ofactl.probe.tasks import TaskData
from ofactl.probe.train import infeasible_count


def test_error_rates_hand_computed():
    assert error_rate([["a", "b", "c"]], [["a", "x", "c", "d"]]) == pytest.approx(2 / 4)
    assert error_rate([list("AB|CD")], [list("AB|CE")]) == pytest.approx(1 / 5)
    assert words(list("THE|CAT|")) == ["THE", "CAT"]
    assert error_rate([words(list("THE|BAT"))], [words(list("THE|CAT|SAT"))]) == pytest.approx(2 / 3)
    logits = torch.full((1, 6, 4), -5.0)
    for t, k in enumerate([1, 1, 0, 2, 2, 1]):
        logits[0, t, k] = 5.0
    assert ctc_greedy(logits, torch.tensor([6])) == [[1, 2, 1]]
    assert ctc_greedy(logits, torch.tensor([2])) == [[1]]


def test_infeasible_counting():
    labels = {"a": [1, 2, 3], "b": [1, 1], "c": [2]}
    frames = {"a": 3, "b": 2, "c": 1}  # b needs 3 frames (a blank between the repeats)
    assert infeasible_count(["a", "b", "c"], labels, frames) == 1


def test_infeasible_counts_the_frames_the_ctc_head_reads():
    """With ``upsample_ctc`` the head reads the 20 ms grid's frames where that is longer than the
    stored sequence, and the stored sequence otherwise; the count follows what it reads."""
    labels = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "c": [1, 2], "d": [3, 4]}
    feats = {u: np.zeros((n, 1, 4), np.float32) for u, n in {"a": 2, "b": 6, "c": 2, "d": 3}.items()}
    input_frames = {"a": 8, "b": 3, "c": 1, "d": 3}  # a: upsampled to 8; b: 3 < its 6 stored frames, read as 6
    splits = {"train": ["a", "c"], "dev": [], "test": ["b", "d"]}
    task = TaskData("pr", "ctc", "per", False, splits, labels, ["p", "q", "r", "s"])
    cfg = ProbeConfig(ctc_head="linear", upsample_ctc=True, epochs=1, batch_size=2)
    assert train_probe(task, feats, cfg, input_frames).infeasible == {"train": 0, "test": 0}
    plain = train_probe(task, feats, replace(cfg, upsample_ctc=False), input_frames)
    assert plain.infeasible == {"train": 1, "test": 0}  # a: 2 frames for 4 labels


def _cls_task(n_per=40, n_cls=4, seed=0):
    rng = np.random.default_rng(seed)
    feats, labels, ids = {}, {}, []
    for c in range(n_cls):
        center = rng.normal(size=8) * 2
        for k in range(n_per):
            u = f"c{c}_{k}"
            T = int(rng.integers(5, 12))
            informative = center + 0.5 * rng.normal(size=(T, 8))
            noise = rng.normal(size=(T, 8)) * 2
            feats[u] = np.stack([noise, informative], axis=1).astype(np.float32)  # layer 1 informative
            labels[u] = [c]
            ids.append(u)
    rng.shuffle(ids)
    n = len(ids)
    splits = {"train": ids[: int(0.7 * n)], "dev": ids[int(0.7 * n) : int(0.85 * n)], "test": ids[int(0.85 * n) :]}
    return TaskData("cls", "cls", "accuracy", True, splits, labels, [str(c) for c in range(n_cls)]), feats


def test_ctc_task_loss_is_the_mean_per_token_ctc_loss():
    from ofactl.probe.train import Probe, task_loss

    torch.manual_seed(0)
    labels = {"a": [1, 2, 2, 3], "b": [4], "c": [2, 3]}
    task = TaskData("pr", "ctc", "per", False, {"train": list(labels), "dev": [], "test": []}, labels,
                    ["p", "q", "r", "s"])
    probe = Probe(2, 8, task.n_outputs, "ctc", ProbeConfig(ctc_head="linear"))
    h, n = torch.randn(3, 9, 2, 8), torch.tensor([4, 4, 7])  # "a" needs 5 frames: dropped, costs 0
    with torch.no_grad():
        logp = probe(h, n).log_softmax(-1).transpose(0, 1)
        want = torch.nn.functional.ctc_loss(logp, torch.tensor([1, 2, 2, 3, 4, 2, 3]), n, torch.tensor([4, 1, 2]),
                                            blank=0, zero_infinity=True)
        assert float(task_loss(probe, task, list(labels), h, n)) == float(want)  # bit for bit
        assert float(want) > 0


@pytest.mark.slow
def test_classification_beats_chance_and_prefers_informative_layer():
    task, feats = _cls_task()
    res = train_probe(task, feats, ProbeConfig(cls_epochs=30, cls_batch_size=32, lr=3e-3, layer_norm=False))
    assert res.test["accuracy"] > 0.8  # chance is 0.25
    assert res.layer_weights[1] > res.layer_weights[0]
    again = train_probe(task, feats, ProbeConfig(cls_epochs=30, cls_batch_size=32, lr=3e-3, layer_norm=False))
    assert again.test == res.test  # deterministic on CPU


def test_classifier_learns_small_between_utterance_differences():
    """Pooled vectors that differ far less than frames (a speaker offset under frame noise) are
    still separated: the pooled vector is standardised before the classifier. A training split
    of 4k + 1 utterances leaves a last batch of one row, which must not break batch statistics."""
    rng = np.random.default_rng(1)
    feats, labels, ids = {}, {}, []
    for c in range(6):
        offset = 0.3 * rng.normal(size=16)
        for k in range(30):
            u = f"s{c}_{k}"
            feats[u] = (offset + rng.normal(size=(int(rng.integers(40, 60)), 16)))[:, None, :].astype(np.float32)
            labels[u] = [c]
            ids.append(u)
    rng.shuffle(ids)
    splits = {"train": ids[:121], "dev": ids[121:150], "test": ids[150:]}
    task = TaskData("sid", "cls", "accuracy", True, splits, labels, [str(c) for c in range(6)])
    res = train_probe(task, feats, ProbeConfig(cls_epochs=30, cls_batch_size=8))
    assert res.test["accuracy"] > 0.6  # chance is 0.17


@pytest.mark.slow
def test_ctc_beats_blank_only_output():
    rng = np.random.default_rng(0)
    V = 5
    protos = rng.normal(size=(V + 1, 12)) * 2
    feats, labels, ids = {}, {}, []
    for k in range(150):
        u = f"u{k}"
        seq = [int(x) for x in rng.integers(1, V + 1, size=int(rng.integers(2, 6)))]
        frames = []
        for t in seq:
            frames += [protos[t]] * 3 + [protos[0]]
        x = np.asarray(frames) + 0.3 * rng.normal(size=(len(frames), 12))
        feats[u] = x[:, None, :].astype(np.float32)
        labels[u] = seq
        ids.append(u)
    splits = {"train": ids[:110], "dev": ids[110:130], "test": ids[130:]}
    task = TaskData("pr", "ctc", "per", False, splits, labels, [f"p{i}" for i in range(1, V + 1)])
    res = train_probe(task, feats, ProbeConfig(epochs=60, ctc_lr=2e-2, batch_size=16, patience=15))
    assert res.test["per"] < 0.3  # a blank-only output has PER 1.0
    assert res.infeasible == {"train": 0, "test": 0}


def _corpus(tmp_path, with_split=False):
    utts = []
    for s in range(10):
        for k in range(6):
            labels = {"speaker": f"s{s}", "label": f"w{k % 3}", "phones": "a b", "text": "hi there"}
            if with_split:
                labels["split"] = "train" if s < 6 else "dev" if s < 8 else "test"
            utts.append(Utterance(f"s{s}_{k}", tmp_path / "x.wav", 16000, 16000, labels))
    return Corpus("mem", utts)


def test_splits_keep_speakers_apart_except_sid(tmp_path):
    c = _corpus(tmp_path)
    spk = {u.id: u.labels["speaker"] for u in c}
    for task in ("ks", "cls", "pr", "asr"):
        t = build_task(task, c, seed=3)
        sets = {s: {spk[u] for u in ids} for s, ids in t.splits.items()}
        assert not sets["train"] & sets["test"] and not sets["train"] & sets["dev"] and not sets["dev"] & sets["test"]
        assert sum(len(v) for v in t.splits.values()) == 60
        assert t.speakers == spk and t.dev_speakers_unseen
    sid = build_task("sid", _corpus(tmp_path, with_split=True))
    assert {spk[u] for u in sid.splits["test"]} == {spk[u] for u in sid.splits["train"]} == {f"s{i}" for i in range(10)}
    assert not sid.dev_speakers_unseen  # the same voices in train and dev
    given = build_task("ks", _corpus(tmp_path, with_split=True))
    assert len(given.splits["train"]) == 36 and len(given.splits["test"]) == 12
    asr = build_task("asr", c)
    assert "".join(asr.vocab[i - 1] for i in asr.labels["s0_0"]) == "HI|THERE"


def test_missing_label_column_is_clear(tmp_path):
    from ofactl.errors import ConfigError

    c = Corpus("mem", [Utterance("a", tmp_path / "a.wav", 10, 16000, {"speaker": "x"})])
    with pytest.raises(ConfigError, match="task pr needs a 'phones' column"):
        build_task("pr", c)
    with pytest.raises(ConfigError, match="unknown task"):
        build_task("xx", c)


@pytest.mark.parametrize(("task", "column"), [("ks", "label"), ("sid", "speaker"), ("cls", "label")])
def test_a_classification_task_with_one_class_is_refused(tmp_path, task, column):
    from ofactl.errors import ConfigError

    c = _corpus(tmp_path)
    for u in c:
        u.labels[column] = "same"
    with pytest.raises(ConfigError, match=f"task {task} on mem: every labelled utterance has the same '{column}' "
                                          r"\(same\); a classifier needs at least two classes"):
        build_task(task, c)


def test_utterances_without_a_label_are_left_out_and_counted(tmp_path):
    c = _corpus(tmp_path)
    c.utterances[0].labels["label"] = c.utterances[1].labels["label"] = " "
    t = build_task("ks", c)
    assert t.unlabelled == 2 and sum(len(v) for v in t.splits.values()) == 58
    assert t.note() == "task ks: 2 utterance(s) with an empty 'label' left out"
    assert build_task("sid", c).note() is None


def test_sid_with_too_few_utterances_per_speaker_is_one_clear_error(tmp_path):
    from ofactl.errors import ConfigError

    utts = [Utterance(f"{s}_{k}", tmp_path / f"{s}_{k}.wav", 16000, 16000, {"speaker": s})
            for s in ("ann", "bob", "cy") for k in range(2)]
    with pytest.raises(ConfigError, match=r"task sid on mem: the test split is empty.*at least 3 per speaker "
                                          r"\(3 of 3 speakers have fewer, e.g. ann, bob, cy\)"):
        build_task("sid", Corpus("mem", utts))


def test_train_probe_without_test_features_is_an_ofactl_error():
    from ofactl.errors import ConfigError
    from ofactl.probe.tasks import TaskData

    task = TaskData("ks", "cls", "accuracy", True, {"train": ["a"], "dev": [], "test": ["b"]},
                    {"a": [0], "b": [1]}, ["x", "y"])
    with pytest.raises(ConfigError, match="no features for the train or test split"):
        train_probe(task, {"a": np.zeros((3, 1, 4), np.float32)}, ProbeConfig(device="cpu"))


def test_ctc_frame_budget_caps_the_epochs():
    rng = np.random.default_rng(0)
    feats = {f"u{k}": rng.normal(size=(10, 1, 4)).astype(np.float32) for k in range(20)}
    labels = {u: [1, 2] for u in feats}
    ids = sorted(feats)
    task = TaskData("pr", "ctc", "per", False, {"train": ids[:12], "dev": ids[12:16], "test": ids[16:]}, labels,
                    ["a", "b"])
    per_epoch = 12 * 10  # training frames
    res = train_probe(task, feats, ProbeConfig(epochs=30, max_frames=3 * per_epoch + 5, device="cpu"))
    assert res.epochs_run == 3  # the budget, not the 30 epochs, ended training
    assert train_probe(task, feats, ProbeConfig(epochs=4, max_frames=0, device="cpu")).epochs_run == 4
    with pytest.raises(ValueError, match="max_frames"):
        ProbeConfig(max_frames=-1).validate()


def test_conv_ctc_head_gives_the_same_frames_padded_as_alone():
    from ofactl.probe.train import Probe

    torch.manual_seed(0)
    probe = Probe(3, 8, 6, "ctc", ProbeConfig(ctc_head="conv", conv_hidden=16, conv_kernel=5)).eval()
    x = torch.randn(2, 11, 3, 8)
    lengths = torch.tensor([11, 7])
    out = probe(x, lengths)
    assert out.shape == (2, 11, 6)
    alone = probe(x[1:, :7], lengths[1:])
    assert torch.allclose(out[1, :7], alone[0], atol=1e-5)  # the padding is not seen as context


def test_bilstm_equals_a_packed_bidirectional_lstm_on_every_valid_frame():
    from ofactl.probe.train import BiLSTM, reverse_valid

    torch.manual_seed(0)
    x, lengths = torch.randn(3, 9, 5), torch.tensor([9, 4, 6])
    assert reverse_valid(torch.arange(9.0)[None, :, None].expand(3, 9, 1), lengths)[1, :, 0].tolist() == \
        [3, 2, 1, 0, 4, 5, 6, 7, 8]  # reversed within its length, padding in place
    ours = BiLSTM(5, 4, layers=2)
    ref = torch.nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)
    with torch.no_grad():  # the same weights, in nn.LSTM's names
        for k, (fwd, bwd) in enumerate(zip(ours.fwd, ours.bwd)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{k}").copy_(getattr(fwd, f"{name}_l0"))
                getattr(ref, f"{name}_l{k}_reverse").copy_(getattr(bwd, f"{name}_l0"))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    want, _ = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True)
    got = ours(x, lengths)
    assert got.shape == (3, 9, 8)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(got[b, :n], want[b, :n], atol=1e-6)
    alone = ours(x[1:2, :4], lengths[1:2])  # padding never reaches a valid frame
    assert torch.allclose(got[1, :4], alone[0], atol=1e-6)


def test_bucketed_batches_cover_each_utterance_once_with_like_lengths():
    from ofactl.probe.train import _batches, bucketed_batches

    ids = [f"u{i}" for i in range(50)]
    frames = {u: (i * 37) % 101 for i, u in enumerate(ids)}
    batches = bucketed_batches(ids, frames, 4, 5, torch.Generator().manual_seed(0))
    assert sorted(u for b in batches for u in b) == sorted(ids) and all(len(b) <= 4 for b in batches)
    padded = sum(max(frames[u] for u in b) * len(b) for b in batches)
    plain = _batches(ids, 4, torch.Generator().manual_seed(0))
    assert padded < 0.8 * sum(max(frames[u] for u in b) * len(b) for b in plain)  # less padding than random
    assert batches == bucketed_batches(ids, frames, 4, 5, torch.Generator().manual_seed(0))  # seeded
    assert bucketed_batches(ids, frames, 4, 1, torch.Generator().manual_seed(0)) == plain
    with pytest.raises(ValueError, match="sort_pool"):
        ProbeConfig(sort_pool=0).validate()


@pytest.mark.parametrize("layer_norm", [True, False])
def test_utterance_head_on_frame_moments_equals_the_head_on_frames(layer_norm):
    from ofactl.probe.train import Probe, frame_moments

    torch.manual_seed(0)
    probe = Probe(3, 8, 5, "cls", ProbeConfig(layer_norm=layer_norm))
    with torch.no_grad():
        probe.featurizer.weights.copy_(torch.tensor([0.3, -1.0, 0.8]))
    probe.eval()
    x, lengths = torch.randn(2, 13, 3, 8) * 3 + 1, torch.tensor([13, 6])
    moments = [frame_moments(x[b, :n], layer_norm) for b, n in enumerate(lengths.tolist())]
    m1, m2 = torch.stack([m for m, _ in moments]), torch.stack([m for _, m in moments])
    assert m1.shape == (2, 3, 8) and m2.shape == (2, 3, 3, 8)
    assert torch.allclose(probe.classify_moments(m1, m2), probe(x, lengths), atol=1e-5)
    logits = probe.train().classify_moments(m1, m2)  # the weights get their gradient too
    logits.sum().backward()
    assert probe.featurizer.weights.grad is not None and probe.featurizer.weights.grad.abs().sum() > 0


def test_probe_inputs_use_moments_only_where_they_are_smaller_than_the_frames():
    from ofactl.probe.train import Probe, ProbeInputs

    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    long = {f"u{i}": rng.normal(size=(20, 3, 4)).astype(np.float32) for i in range(3)}
    short = {f"u{i}": rng.normal(size=(5, 3, 4)).astype(np.float32) for i in range(3)}  # 2 x (3 + 1) > 5
    assert ProbeInputs(long, list(long), "cls", True, None, cpu).moments is not None
    assert ProbeInputs(short, list(short), "cls", True, None, cpu).moments is None
    assert ProbeInputs(long, list(long), "ctc", True, None, cpu).moments is None
    probe = Probe(3, 4, 2, "cls", ProbeConfig()).eval()
    by_moments, n = ProbeInputs(long, list(long), "cls", True, None, cpu).outputs(probe, ["u2", "u0"])
    x = torch.from_numpy(np.stack([long["u2"], long["u0"]]))
    assert n.tolist() == [20, 20] and torch.allclose(by_moments, probe(x, n), atol=1e-5)


def _pair_coded_ctc_task(n: int = 120, seed: int = 0) -> tuple[TaskData, dict[str, np.ndarray]]:
    """Tokens coded by ordered pairs of two frame prototypes (ab, ba, aa, bb): one frame alone
    says nothing about its token; two neighbouring frames say everything."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(3, 10)) * 2  # a, b and silence
    codes = {1: (0, 1), 2: (1, 0), 3: (0, 0), 4: (1, 1)}
    feats, labels, ids = {}, {}, []
    for k in range(n):
        seq = [int(t) for t in rng.integers(1, 5, size=int(rng.integers(2, 5)))]
        frames = []
        for t in seq:
            frames += [protos[codes[t][0]], protos[codes[t][1]], protos[2]]
        x = np.asarray(frames) + 0.2 * rng.normal(size=(len(frames), 10))
        feats[f"u{k}"], labels[f"u{k}"] = x[:, None, :].astype(np.float32), seq
        ids.append(f"u{k}")
    splits = {"train": ids[: n - 30], "dev": ids[n - 30 : n - 15], "test": ids[n - 15 :]}
    return TaskData("pr", "ctc", "per", False, splits, labels, ["ab", "ba", "aa", "bb"]), feats


def test_conv_ctc_head_reads_context_that_a_linear_head_cannot():
    task, feats = _pair_coded_ctc_task()
    base = ProbeConfig(ctc_head="conv", epochs=25, min_epochs=25, ctc_lr=2e-2, batch_size=16, conv_hidden=32,
                       conv_kernel=3)
    conv = train_probe(task, feats, base)
    assert conv.test["per"] < 0.2
    linear = train_probe(task, feats, replace(base, ctc_head="linear"))
    assert linear.test["per"] > conv.test["per"] + 0.3


def test_even_conv_kernel_is_refused_naming_it():
    with pytest.raises(ValueError, match="conv_kernel"):
        ProbeConfig(ctc_head="conv", conv_kernel=4).validate()


def test_settings_for_keeps_each_kind_to_its_own_settings():
    from dataclasses import fields

    from ofactl.probe.train import CLS_ONLY, CTC_ONLY

    names = {f.name for f in fields(ProbeConfig)}
    assert CTC_ONLY.issubset(names) and CLS_ONLY.issubset(names) and not CTC_ONLY & CLS_ONLY  # no stale or doubled names
    base = ProbeConfig()
    ctc_change, cls_change, shared = replace(base, ctc_head="linear"), replace(base, cls_epochs=7), replace(base, seed=3)
    assert ctc_change.settings_for("cls") == base.settings_for("cls")
    assert ctc_change.settings_for("ctc") != base.settings_for("ctc")
    assert cls_change.settings_for("ctc") == base.settings_for("ctc")
    assert cls_change.settings_for("cls") != base.settings_for("cls")
    assert all(shared.settings_for(k) != base.settings_for(k) for k in ("ctc", "cls"))
    assert replace(base, device="cpu").settings_for("ctc") == base.settings_for("ctc")  # where, not what


def test_train_probes_means_successive_seeds_and_one_run_is_train_probe():
    task, feats = _cls_task()
    cfg = ProbeConfig(cls_epochs=4, min_epochs=1, cls_batch_size=32, lr=3e-3, seed=5)
    runs = [train_probe(task, feats, replace(cfg, seed=5 + k)) for k in range(3)]
    res = train_probes(task, feats, cfg, runs=3)
    assert res.test_runs == [r.test["accuracy"] for r in runs]
    assert res.test["accuracy"] == pytest.approx(np.mean(res.test_runs))
    assert res.dev["accuracy"] == pytest.approx(np.mean([r.dev["accuracy"] for r in runs]))
    assert res.layer_weights == pytest.approx(np.mean([r.layer_weights for r in runs], 0), abs=1e-4)
    assert len(set(res.test_runs)) > 1 or len({tuple(r.layer_weights) for r in runs}) > 1  # the seeds differ
    one = train_probes(task, feats, cfg)
    assert one.test == runs[0].test and one.test_runs == []
