from __future__ import annotations

import sys
import types

import pytest
import torch
import torchaudio

from ofactl.errors import CheckpointError
from ofactl.model.teacher import load_teacher, parse_conv_layers

CONV = [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2


def ta_model(layer_norm_first=False, seed=0):
    torch.manual_seed(seed)
    m = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm" if layer_norm_first else "group_norm",
        extractor_conv_layer_config=CONV, extractor_conv_bias=layer_norm_first,
        encoder_embed_dim=128, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4, encoder_num_layers=3, encoder_num_heads=2,
        encoder_attention_dropout=0.0, encoder_ff_interm_features=256, encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0, encoder_layer_norm_first=layer_norm_first, encoder_layer_drop=0.0,
        aux_num_out=None)
    return m.eval()


def wav(n=8000, seed=1):
    return torch.randn(1, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lnf", [False, True])
def test_torchaudio_state_dict_parity(tmp_path, lnf):
    ref = ta_model(lnf)
    p = tmp_path / "hubert.pt"
    torch.save(ref.state_dict(), p)
    t = load_teacher(p)
    assert t.format == "torchaudio" and t.arch.num_heads == 2 and t.arch.layer_norm_first == lnf
    x = wav()
    ours = t(x, torch.tensor([x.shape[1]]))
    with torch.no_grad():
        feats = ref.extract_features(x)[0]
    assert ours.states.shape[2] == 4
    for i, f in enumerate(feats):
        assert (ours.states[0, :, i + 1] - f[0]).abs().max() < 1e-4
    assert not any(p.requires_grad for p in t.parameters()) and not t.training


def test_state_dict_with_config_entry(tmp_path):
    ref = ta_model()
    p = tmp_path / "wrapped.pt"
    torch.save({"state_dict": ref.state_dict(), "config": {"num_heads": 4}}, p)
    assert load_teacher(p).arch.num_heads == 4


@pytest.mark.slow
@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
def test_huggingface_dir_parity(tmp_path, kind, stable):
    transformers = pytest.importorskip("transformers")
    Config = transformers.HubertConfig if kind == "hubert" else transformers.Wav2Vec2Config
    Model = transformers.HubertModel if kind == "hubert" else transformers.Wav2Vec2Model
    cfg = Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                 feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
                 conv_bias=stable, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 feat_proj_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(0)
    m = Model(cfg).eval()
    m.save_pretrained(tmp_path / "hf")
    t = load_teacher(tmp_path / "hf")
    assert t.format == "huggingface"
    x = wav(6000)
    with torch.no_grad():
        ref = m(x, output_hidden_states=True).hidden_states
    ours = t(x, torch.tensor([x.shape[1]]))
    assert ours.states.shape[2] == len(ref) == 3
    for i, r in enumerate(ref):
        assert (ours.states[0, :, i] - r[0]).abs().max() < 1e-4, f"layer {i}"


def test_huggingface_ctc_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=4, vocab_size=8)
    torch.manual_seed(0)
    m = transformers.HubertForCTC(cfg).eval()
    m.save_pretrained(tmp_path / "ctc")
    t = load_teacher(tmp_path / "ctc")
    x = wav(4000)
    with torch.no_grad():
        ref = m.hubert(x, output_hidden_states=True).hidden_states
    assert (t(x, torch.tensor([4000])).states[0, :, -1] - ref[-1][0]).abs().max() < 1e-4


_TO_FAIRSEQ = [
    ("feature_extractor.conv_layers.{i}.conv.weight", "feature_extractor.conv_layers.{i}.0.weight"),
    ("encoder.feature_projection.layer_norm.", "layer_norm."),
    ("encoder.feature_projection.projection.", "post_extract_proj."),
    ("encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
    ("encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
    ("encoder.transformer.pos_conv_embed.conv.bias", "encoder.pos_conv.0.bias"),
    ("encoder.transformer.layer_norm.", "encoder.layer_norm."),
]


def to_fairseq(sd):
    out = {}
    for k, v in sd.items():
        n = k
        if ".conv_layers." in k:
            i = k.split(".")[2]
            n = k.replace(f"conv_layers.{i}.conv.", f"conv_layers.{i}.0.").replace(f"conv_layers.{i}.layer_norm.", f"conv_layers.{i}.2.")
        for a, b in _TO_FAIRSEQ[1:]:
            if n.startswith(a):
                n = b + n[len(a):]
        if n.startswith("encoder.transformer.layers."):
            n = (n.replace("encoder.transformer.layers.", "encoder.layers.").replace(".attention.", ".self_attn.")
                 .replace(".layer_norm.", ".self_attn_layer_norm.").replace(".feed_forward.intermediate_dense.", ".fc1.")
                 .replace(".feed_forward.output_dense.", ".fc2."))
        out[n] = v
    out["mask_emb"] = torch.zeros(128)
    out["label_embs_concat"] = torch.zeros(10, 128)
    out["final_proj.weight"] = torch.zeros(16, 128)
    return out


def _with_symbols(d):
    d.symbols = ["<s>", "<pad>", "1", "2"]
    return d


@pytest.fixture
def fairseq_ckpt(tmp_path):
    """A fairseq-style HuBERT checkpoint pickled with stand-in fairseq classes."""
    ref = ta_model()
    mod = types.ModuleType("fairseq.data.dictionary")
    Dictionary = type("Dictionary", (), {"__module__": "fairseq.data.dictionary"})
    mod.Dictionary = Dictionary
    saved = {k: sys.modules.get(k) for k in ("fairseq", "fairseq.data", "fairseq.data.dictionary")}
    sys.modules.update({"fairseq": types.ModuleType("fairseq"), "fairseq.data": types.ModuleType("fairseq.data"),
                        "fairseq.data.dictionary": mod})
    try:
        ckpt = {
            "model": to_fairseq(ref.state_dict()),
            "cfg": {"model": {"_name": "hubert", "extractor_mode": "default",
                              "conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
                              "encoder_embed_dim": 128, "encoder_layers": 3, "encoder_attention_heads": 2,
                              "encoder_ffn_embed_dim": 256, "conv_pos": 16, "conv_pos_groups": 4,
                              "layer_norm_first": False, "conv_bias": False},
                    "task": {"normalize": False}},
            "task_state": {"dictionaries": [_with_symbols(Dictionary())]},
        }
        p = tmp_path / "hubert_fairseq.pt"
        torch.save(ckpt, p)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return p, ref


def test_fairseq_needs_trust_then_matches(fairseq_ckpt):
    p, ref = fairseq_ckpt
    assert "fairseq" not in sys.modules
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_teacher(p)
    t = load_teacher(p, trust=True)
    assert t.format == "fairseq" and t.arch.num_layers == 3
    x = wav()
    with torch.no_grad():
        feats = ref.extract_features(x)[0]
    ours = t(x, torch.tensor([x.shape[1]]))
    for i, f in enumerate(feats):
        assert (ours.states[0, :, i + 1] - f[0]).abs().max() < 1e-4


def test_conv_layer_spec_parser():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")[-1] == (512, 2, 2)
    assert len(parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")) == 7
    with pytest.raises(CheckpointError):
        parse_conv_layers("__import__('os').system('true')")


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="teacher not found.*accepted"):
        load_teacher(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_teacher(junk)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_teacher(tmp_path / "emptydir")
    with pytest.raises(CheckpointError, match="unknown random teacher"):
        load_teacher("random:huge")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no HuBERT CNN weights"):
        load_teacher(tmp_path / "other.pt")


def test_random_teachers_are_seeded():
    a, b = load_teacher("random:tiny", seed=3), load_teacher("random:tiny", seed=3)
    x = wav(3000)
    L = torch.tensor([3000])
    assert torch.equal(a(x, L).states, b(x, L).states)
    assert a.num_hidden == 5


def test_file_formats_are_sniffed_before_advice(tmp_path):
    from ofactl.model.teacher import sniff_format

    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(range(256)) * 16)  # 4 KB of noise
    assert sniff_format(rnd) == "unknown"
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
        load_teacher(rnd)
    assert "pass --trust-checkpoint" not in str(e.value) and "may run code" not in str(e.value)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_teacher(rnd, trust=True)  # trust does not make noise loadable
    torch.save({"a": torch.zeros(2)}, tmp_path / "z.pt")
    assert sniff_format(tmp_path / "z.pt") == "zip"
    import pickle

    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert sniff_format(tmp_path / "p.pkl") == "pickle"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.bin"))
    assert sniff_format(tmp_path / "w.bin") == "safetensors"
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_teacher(tmp_path / "e.pt")


class _Custom:  # a class a plain torch.load(weights_only=True) refuses
    def __init__(self) -> None:
        self.note = "objects beside the tensors"


def _hf_dir(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    m = transformers.HubertModel(cfg).eval()
    m.save_pretrained(tmp_path / name)
    return tmp_path / name, m


def test_huggingface_corrupt_safetensors_is_one_line(tmp_path):
    d, _ = _hf_dir(tmp_path, "hf")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file") as e:
        load_teacher(d)
    assert "\n" not in str(e.value)


def test_huggingface_bin_honours_trust(tmp_path):
    d, m = _hf_dir(tmp_path, "hfbin")
    (d / "model.safetensors").unlink()
    torch.save({**m.state_dict(), "extra": _Custom()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle checkpoint.*--trust-checkpoint"):
        load_teacher(d)
    t = load_teacher(d, trust=True)  # the flag is honoured for HuggingFace .bin files too
    assert t.format == "huggingface" and t.arch.embed_dim == 32
    torch.save(m.state_dict(), d / "pytorch_model.bin")  # tensors only: no trust needed
    assert load_teacher(d).arch.num_layers == 1


BUILTIN_ARCHS = {"hubert-tiny": (128, 4, 4, 64, 512, False), "hubert-small": (192, 5, 4, 64, 768, False),
                 "hubert-tiny-v2": (128, 4, 4, 64, 512, True), "hubert-tiny-v3": (128, 4, 4, 64, 512, True)}  # embed, layers, heads, CNN, FFN, normalised waveform


def test_every_builtin_teacher_is_tested():
    from ofactl.model.teacher import BUILTIN

    assert set(BUILTIN) == set(BUILTIN_ARCHS)


@pytest.mark.parametrize("name,arch", list(BUILTIN_ARCHS.items()))
def test_builtin_teacher_loads_with_its_recorded_checksum_and_architecture(name, arch):
    from ofactl.checkpoint import file_sha256
    from ofactl.model.teacher import BUILTIN, builtin_path

    p = builtin_path(name)
    assert p.is_file() and p.stat().st_size <= 10 * 2**20  # ships inside the package, at most 10 MB
    assert file_sha256(p) == BUILTIN[name]["sha256"]
    t = load_teacher(f"builtin:{name}")
    assert t.source == f"builtin:{name}" and t.format == "builtin"
    assert (t.arch.embed_dim, t.arch.num_layers, t.arch.num_heads, t.arch.cnn_dim, t.arch.ffn_dim,
            t.arch.normalize_waveform) == arch
    x = wav(16000)
    h = t(x, torch.tensor([16000]))
    assert h.states.shape == (1, 49, arch[1] + 1, arch[0]) and torch.isfinite(h.states).all()
    with pytest.raises(CheckpointError, match="unknown built-in teacher"):
        load_teacher("builtin:hubert-huge")


def test_a_run_folder_that_holds_no_teacher_is_named_for_what_it_is(tmp_path):
    pre, dist = tmp_path / "pre", tmp_path / "dist"
    for run, section in ((pre, "pretrain"), (dist, "distill")):
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(f"{section}:\n  steps: 100\n")
    with pytest.raises(CheckpointError, match=r"pre: an 'ofactl pretrain' run that has not finished: its teacher "
                       r"\(teacher.safetensors\) is written when it ends; 'ofactl info .*pre' shows how far"):
        load_teacher(str(pre))
    with pytest.raises(CheckpointError, match=r"dist: an 'ofactl distill' run folder; its student.pt is a student, "
                       r"not a teacher \(pass it as --ckpt\)"):
        load_teacher(str(dist))
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="folder has no config.json"):  # any other folder: as before
        load_teacher(str(tmp_path / "other"))
