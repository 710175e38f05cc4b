"""Frozen HuBERT-family teachers from local files; never downloads.

Accepted ``--teacher`` values:

- ``builtin:hubert-tiny-v3`` (the tiny presets' default), ``builtin:hubert-tiny``,
  ``builtin:hubert-small`` and ``builtin:hubert-tiny-v2``:
  small HuBERTs that ship inside the package, pretrained by ``ofactl pretrain -c pretrain-tiny``
  (docs/models.md), each checked against its recorded sha256;
- ``random:tiny`` / ``random:base``: an untrained model of that shape (only when named);
- a torchaudio state dict (``hubert_base``-style keys) in a ``.pt``/``.pth``/``.safetensors``
  file, loaded with ``weights_only=True``; optionally ``{"state_dict": ..., "config": {...}}``;
- a HuggingFace ``HubertModel``/``Wav2Vec2Model`` folder (``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``, with or without a ``hubert.`` prefix);
- a fairseq HuBERT / wav2vec 2.0 ``.pt`` checkpoint, read without fairseq installed. It is a
  pickle, so it loads only with ``trust=True`` (``--trust-checkpoint``); the architecture comes
  from the checkpoint's own config;
- an ``ofactl pretrain`` run folder: the ``teacher.safetensors`` it exported.

All are converted to torchaudio's ``Wav2Vec2Model`` layout and return every hidden state:
L + 1 states (the transformer input, then each layer), as HuggingFace's ``output_hidden_states``.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ofactl.checkpoint import file_sha256
from ofactl.errors import CheckpointError
from ofactl.model.blocks import (
    Hidden,
    HubertArch,
    build_wav2vec2,
    cnn_forward,
    normalize_waveform,
    transformer_states,
)
from ofactl.model.student import TINY_CONV

ACCEPTED = ("builtin:hubert-tiny, builtin:hubert-small, builtin:hubert-tiny-v2, builtin:hubert-tiny-v3, "
            "random:tiny, random:base, "
            "a torchaudio state dict (.pt/.pth/.safetensors), a HuggingFace HubertModel/Wav2Vec2Model folder "
            "(config.json + weights), or a fairseq HuBERT/wav2vec 2.0 .pt checkpoint (with --trust-checkpoint), "
            "or an 'ofactl pretrain' run folder")
PRETRAIN_TEACHER = "teacher.safetensors"  # what an ``ofactl pretrain`` run folder exports

RANDOM_ARCHS = {
    "tiny": HubertArch(conv_layers=TINY_CONV, embed_dim=64, num_layers=4, num_heads=2, ffn_dim=128,
                       pos_conv_kernel=16, pos_conv_groups=4),
    "base": HubertArch(),
}


class Teacher(nn.Module):
    """A frozen HuBERT-family encoder (torchaudio modules) with a description of its source."""

    def __init__(self, arch: HubertArch, source: str = "", fingerprint: str = "", fmt: str = "") -> None:
        super().__init__()
        self.arch = arch
        self.model = build_wav2vec2(arch)
        self.source, self.fingerprint, self.format = source, fingerprint, fmt
        self.input_level_db: float | None = None  # median RMS level (dBFS) of its pretraining audio, if recorded

    @property
    def num_hidden(self) -> int:
        """Hidden states per frame: the projected CNN output and one per transformer layer."""
        return self.arch.num_layers + 1

    def freeze(self) -> Teacher:
        """Eval mode, no gradients; returns self."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    @torch.no_grad()
    def forward(self, wav: Tensor, lengths: Tensor) -> Hidden:
        """(B, N) 16 kHz samples with lengths -> hidden states (B, T, L+1, D) with lengths."""
        if self.arch.normalize_waveform:
            wav = normalize_waveform(wav, lengths)
        x, n = cnn_forward(self.model.feature_extractor, wav, lengths)
        x = self.model.encoder.feature_projection(x)
        states = transformer_states(self.model.encoder.transformer, x, n)
        return Hidden(torch.stack(states, dim=2), n)

    def describe(self) -> dict[str, Any]:
        """Source, format, sha256 fingerprint and architecture (``ofactl info --teacher``)."""
        return {"source": self.source, "format": self.format, "fingerprint": self.fingerprint,
                "arch": asdict(self.arch), "input_level_db": self.input_level_db}


# ----------------------------------------------------------------------------- dispatch
# Teachers that ship inside the package (``builtin:NAME``): file and checksum, checked at load.
# The model card (docs/models.md) says how each was made.
BUILTIN = {
    "hubert-tiny": {  # the first: 5,000 steps; the tiny presets' teacher before v3
        "file": "hubert-tiny.safetensors",
        "sha256": "969a859ceaa213614ba35c6edcb14162ff09ce3eb0503dabc32de73255a1f13f",
    },
    "hubert-small": {  # trained on a GPU: 5 x 192-d layers, the same 64-channel CNN; opt-in
        "file": "hubert-small.safetensors",
        "sha256": "6aafb638595786d999c3d5273104e661319201cf8595812eb54f3602c932642c",
    },
    "hubert-tiny-v2": {  # hubert-tiny's shape, normalised waveform, speed-perturbed, 16,000 steps; opt-in
        "file": "hubert-tiny-v2.safetensors",
        "sha256": "8e3ae96dff183e03feaa7e120fd9fb456bddc8ba61037dc32ce8ad5c1835d606",
    },
    "hubert-tiny-v3": {  # hubert-tiny-v2's recipe at 32,000 steps; the tiny presets' teacher
        "file": "hubert-tiny-v3.safetensors",
        "sha256": "f17ad29a49d5f70eb2fe0abc7cfaed374c23ac44244662b573585086a7238df5",
    },
}


def builtin_path(name: str) -> Path:
    """Where a built-in teacher lives in the installed package."""
    if name not in BUILTIN:
        raise CheckpointError(f"unknown built-in teacher 'builtin:{name}'; built-in: "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN))
    return Path(__file__).resolve().parent.parent / "_teachers" / BUILTIN[name]["file"]


def _load_builtin(name: str) -> Teacher:
    p = builtin_path(name)
    if not p.is_file():
        raise CheckpointError(f"builtin:{name} is missing from this installation ({p}); reinstall ofactl")
    want = BUILTIN[name]["sha256"]
    got = file_sha256(p)
    if want and got != want:
        raise CheckpointError(f"builtin:{name}: {p} has sha256 {got[:12]}..., expected {want[:12]}...; reinstall ofactl")
    t = _from_safetensors(p)
    t.source, t.format = f"builtin:{name}", "builtin"
    return t


def load_teacher(spec: str | Path, trust: bool = False, seed: int = 0) -> Teacher:
    """Load a teacher from ``spec`` (see module docstring); frozen, in eval mode."""
    s = str(spec)
    if s.startswith("builtin:"):
        return _load_builtin(s.split(":", 1)[1]).freeze()
    if s.startswith("random:"):
        name = s.split(":", 1)[1]
        if name not in RANDOM_ARCHS:
            raise CheckpointError(f"unknown random teacher '{s}'; accepted: {ACCEPTED}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            t = Teacher(RANDOM_ARCHS[name], s, f"{s}#seed={seed}", "random")
        return t.freeze()
    p = teacher_file(Path(s))
    if not p.exists():
        raise CheckpointError(f"teacher not found: {p}; accepted: {ACCEPTED}")
    if p.is_dir():
        return _load_hf_dir(p, trust).freeze()
    if sniff_format(p) == "safetensors" or p.suffix == ".safetensors":
        return _from_safetensors(p).freeze()
    obj = _torch_load(p, trust)
    return _from_object(obj, p).freeze()


def teacher_file(p: Path) -> Path:
    """The file an ``ofactl pretrain`` run folder exported (``teacher.safetensors``); any other
    path as given (a file, a HuggingFace folder)."""
    if p.is_dir() and not (p / "config.json").exists() and (p / PRETRAIN_TEACHER).is_file():
        return p / PRETRAIN_TEACHER
    if p.is_dir() and not (p / "config.json").exists():
        _refuse_run_folder(p)
    return p


def _refuse_run_folder(p: Path) -> None:
    """One clear error for the run folder of a ``pretrain`` that has not finished (its teacher is
    written at the end) or of a ``distill`` (a student, not a teacher); nothing for other folders."""
    from ofactl.config import run_settings

    section = run_settings(p)[0]
    if section == "pretrain":
        raise CheckpointError(f"{p}: an 'ofactl pretrain' run that has not finished: its teacher ({PRETRAIN_TEACHER}) "
                              f"is written when it ends; 'ofactl info {p}' shows how far it has got, and the same "
                              "command with --resume goes on")
    if section == "distill":
        raise CheckpointError(f"{p}: an 'ofactl distill' run folder; its student.pt is a student, not a teacher "
                              "(pass it as --ckpt)")


def sniff_format(path: Path) -> str:
    """What a weights file is, from its first bytes: ``zip`` (torch.save's archive), ``pickle``
    (a bare pickle or torch's legacy format), ``safetensors``, ``empty`` or ``unknown``."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = Path(path).stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _from_safetensors(p: Path) -> Teacher:
    """A teacher from a safetensors file, with what an ofactl teacher records in its metadata
    (``ofactl pretrain``: the architecture and the level of its pretraining audio)."""
    meta = _safetensors_meta(p)
    t = _from_state_dict(_load_safetensors(p), _safetensors_arch(meta, p), p)
    level = meta.get("input_level_db")
    try:
        t.input_level_db = None if level is None else float(level)
    except ValueError:
        raise CheckpointError(f"{p}: unreadable input_level_db in its metadata ({level!r})") from None
    return t


def _safetensors_meta(p: Path) -> dict[str, str]:
    """A safetensors file's metadata (empty when it has none or cannot be read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}  # reported by _load_safetensors


def _safetensors_arch(meta: dict[str, str], p: Path) -> dict[str, Any] | None:
    """The architecture an ofactl teacher file records in its metadata (``ofactl pretrain``)."""
    raw = meta.get("ofactl_teacher_arch")
    if raw is None:
        return None
    try:
        arch = json.loads(raw)
        arch["conv_layers"] = tuple(tuple(int(v) for v in c) for c in arch["conv_layers"])
        return dict(arch)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable architecture in its metadata ({e})") from None


def _load_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:  # SafetensorError, OSError, ...: one line whatever the cause
        raise CheckpointError(f"{p}: not a readable safetensors file ({_short(e)})") from None


# ----------------------------------------------------------------------------- pickle handling
class _Stub:
    """Stands in for fairseq / omegaconf classes inside a trusted checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


_STUB_ROOTS = ("fairseq", "omegaconf", "hydra")


class _TrustedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in _STUB_ROOTS:
            return type(name, (_Stub,), {"__module__": module})
        return super().find_class(module, name)


_SHIM = types.ModuleType("ofactl_trusted_pickle")
_SHIM.Unpickler = _TrustedUnpickler  # type: ignore[attr-defined]
_SHIM.load = pickle.load  # type: ignore[attr-defined]
_SHIM.__dict__["UnpicklingError"] = pickle.UnpicklingError


def _torch_load(p: Path, trust: bool) -> Any:
    """A torch.save file: tensors only without ``trust``; a real pickle with objects in it only
    with ``trust``. Files that are no checkpoint at all are named as such, never as pickles."""
    kind = sniff_format(p)
    if kind == "empty":
        raise CheckpointError(f"{p}: empty file (0 bytes), not a checkpoint; accepted: {ACCEPTED}")
    if kind == "unknown":
        raise CheckpointError(f"{p}: not a checkpoint (neither a torch.save archive, a pickle nor "
                              f"safetensors, judging by its first bytes); accepted: {ACCEPTED}")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            hint = " (a fairseq checkpoint)" if "fairseq" in str(e) else ""
            raise CheckpointError(
                f"{p} is a pickle checkpoint{hint} holding Python objects, which may run code when "
                f"loaded; pass --trust-checkpoint if you trust its source") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated checkpoint ({_short(e)}); accepted: {ACCEPTED}") from None
    try:
        return torch.load(str(p), map_location="cpu", weights_only=False, pickle_module=_SHIM)
    except Exception as e:
        raise CheckpointError(f"{p}: cannot read checkpoint ({_short(e)})") from None


def _short(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# ----------------------------------------------------------------------------- formats
def _from_object(obj: Any, p: Path) -> Teacher:
    if isinstance(obj, dict) and "model" in obj and ("cfg" in obj or "args" in obj):
        return _from_fairseq(obj, p)
    if isinstance(obj, dict) and obj.get("format") == "ofactl-student":
        raise CheckpointError(f"{p} is an ofactl student checkpoint, not a HuBERT teacher; accepted: {ACCEPTED}")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return _from_state_dict(obj["state_dict"], obj.get("config"), p)
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return _from_state_dict(obj, None, p)
    raise CheckpointError(f"{p}: unrecognised checkpoint contents; accepted: {ACCEPTED}")


def _from_state_dict(sd: dict[str, Tensor], config: dict[str, Any] | None, p: Path) -> Teacher:
    """torchaudio-keyed, or HF-keyed (converted) state dict; architecture inferred from shapes."""
    if any(k.startswith("encoder.layers.") or k.startswith("hubert.") for k in sd):
        sd = _hf_to_torchaudio(sd, feat_proj_layer_norm=any("feature_projection.layer_norm" in k for k in sd))
    if "feature_extractor.conv_layers.0.conv.weight" not in sd:
        raise CheckpointError(f"{p}: no HuBERT CNN weights (feature_extractor.conv_layers.0.conv.weight); accepted: {ACCEPTED}")
    arch = _infer_arch(sd, p)
    if config:
        try:
            arch = HubertArch(**{**asdict(arch), **config})
        except TypeError as e:
            raise CheckpointError(f"{p}: bad 'config' entry ({e})") from None
    return _build(arch, sd, p, "torchaudio", file_sha256(p))


_KERNEL_STRIDE = {10: 5, 3: 2, 2: 2}


def _infer_arch(sd: dict[str, Tensor], p: Path) -> HubertArch:
    convs = []
    i = 0
    while f"feature_extractor.conv_layers.{i}.conv.weight" in sd:
        out_c, _, k = sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape
        if k not in _KERNEL_STRIDE:
            raise CheckpointError(f"{p}: conv layer {i} has kernel {k}; give the strides in a 'config' entry")
        convs.append((int(out_c), int(k), _KERNEL_STRIDE[int(k)]))
        i += 1
    n_layers = 0
    while f"encoder.transformer.layers.{n_layers}.attention.q_proj.weight" in sd:
        n_layers += 1
    if n_layers == 0:
        raise CheckpointError(f"{p}: no transformer layers found; accepted: {ACCEPTED}")
    dim = int(sd["encoder.feature_projection.projection.weight"].shape[0])
    v = sd.get("encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1")
    if v is None:
        raise CheckpointError(f"{p}: no positional convolution weights found")
    layer_mode = "feature_extractor.conv_layers.1.layer_norm.weight" in sd
    return HubertArch(
        conv_layers=tuple(convs), conv_norm="layer_norm" if layer_mode else "group_norm",
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd, embed_dim=dim,
        num_layers=n_layers, num_heads=max(1, dim // 64),
        ffn_dim=int(sd["encoder.transformer.layers.0.feed_forward.intermediate_dense.weight"].shape[0]),
        pos_conv_kernel=int(v.shape[2]), pos_conv_groups=int(dim // v.shape[1]),
        layer_norm_first=layer_mode,
    )


def _build(arch: HubertArch, sd: dict[str, Tensor], p: Path | str, fmt: str, fp: str) -> Teacher:
    t = Teacher(arch, str(p), fp, fmt)
    sd = _legacy_weight_norm(sd)
    own = t.model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing == ["encoder.feature_projection.layer_norm.weight", "encoder.feature_projection.layer_norm.bias"]:
        # HF HubertModel with feat_proj_layer_norm=False: an identity layer norm is exact only
        # approximately, so say so rather than pretend.
        raise CheckpointError(f"{p}: models without a feature-projection layer norm are not supported")
    if missing:
        raise CheckpointError(f"{p}: checkpoint lacks {len(missing)} weight(s) the architecture needs, e.g. {missing[0]}")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{p}: {k} has shape {list(sd[k].shape)}, the architecture expects {list(own[k].shape)}")
    t.model.load_state_dict({k: sd[k].float() for k in own})
    return t


def _legacy_weight_norm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """weight_g/weight_v (old weight_norm) -> parametrizations.weight.original0/1."""
    out = {}
    for k, v in sd.items():
        k = k.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        k = k.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        out[k] = v
    return out


def _hf_to_torchaudio(sd: dict[str, Tensor], feat_proj_layer_norm: bool = True) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("hubert.", "wav2vec2."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("feature_projection."):
            k = "encoder." + k
        elif k.startswith("encoder.") and not k.startswith("encoder.transformer."):
            k = "encoder.transformer." + k[len("encoder."):]
        elif not k.startswith("feature_extractor."):
            continue  # masked_spec_embed, lm_head, quantizer ...
        out[k] = v
    return out


def hf_files(p: Path) -> tuple[Path, Path]:
    """The two files of a HuggingFace folder that make the teacher: config.json and its weights
    (model.safetensors before pytorch_model.bin); the folder's other files play no part."""
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: folder has no config.json, so it is not a HuggingFace model; accepted: {ACCEPTED}")
    weights = [w for w in (p / "model.safetensors", p / "pytorch_model.bin") if w.is_file()]
    if not weights:
        raise CheckpointError(f"{p}: no model.safetensors or pytorch_model.bin next to config.json")
    return cfg_path, weights[0]


def hf_fingerprint(p: Path) -> str:
    """A HuggingFace teacher's identity: the sha256 of the two files it is made from."""
    return file_sha256(*hf_files(p))


def _load_hf_dir(p: Path, trust: bool = False) -> Teacher:
    cfg_path, w = hf_files(p)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
    # pytorch_model.bin is a torch.save archive: tensors load as they are, and one that holds
    # other objects loads with --trust-checkpoint like any pickle
    sd = _load_safetensors(w) if w.suffix == ".safetensors" else _torch_load(w, trust)
    model_type = cfg.get("model_type", "")
    if model_type not in ("hubert", "wav2vec2"):
        raise CheckpointError(f"{cfg_path}: model_type {model_type!r}; accepted HuggingFace types: hubert, wav2vec2")
    try:
        arch = HubertArch(
            conv_layers=tuple((int(c), int(k), int(s))
                              for c, k, s in zip(cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])),
            conv_norm="layer_norm" if cfg.get("feat_extract_norm", "group") == "layer" else "group_norm",
            conv_bias=bool(cfg.get("conv_bias", False)),
            embed_dim=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]), ffn_dim=int(cfg["intermediate_size"]),
            pos_conv_kernel=int(cfg.get("num_conv_pos_embeddings", 128)),
            pos_conv_groups=int(cfg.get("num_conv_pos_embedding_groups", 16)),
            layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: missing or invalid field {e}") from None
    sd = _hf_to_torchaudio(sd, cfg.get("feat_proj_layer_norm", True))
    return _build(arch, sd, p, "huggingface", hf_fingerprint(p))


def parse_conv_layers(spec: str) -> tuple[tuple[int, int, int], ...]:
    """fairseq ``conv_feature_layers``: "[(512,10,5)] + [(512,3,2)] * 4" -> tuples (no eval)."""
    out: list[tuple[int, int, int]] = []
    for term in spec.split("+"):
        m = re.fullmatch(r"\s*(\[.*\])\s*(?:\*\s*(\d+))?\s*", term)
        if not m:
            raise CheckpointError(f"cannot parse conv_feature_layers {spec!r}")
        try:
            items = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            raise CheckpointError(f"cannot parse conv_feature_layers {spec!r}") from None
        out.extend([(int(it[0]), int(it[1]), int(it[2])) for it in items] * int(m.group(2) or 1))
    return tuple(out)


_FAIRSEQ_RULES = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"encoder.feature_projection.projection.\1"),
    (r"^layer_norm\.(weight|bias)$", r"encoder.feature_projection.layer_norm.\1"),
    (r"^encoder\.pos_conv\.0\.(.+)$", r"encoder.transformer.pos_conv_embed.conv.\1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.transformer.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$",
     r"encoder.transformer.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.transformer.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.transformer.layers.\1.final_layer_norm.\2"),
]


def fairseq_to_torchaudio(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename fairseq HuBERT/wav2vec 2.0 keys; drops mask_emb, label_embs_concat, final_proj,
    quantizer and other pre-training-only weights."""
    out = {}
    for k, v in sd.items():
        for rx, rep in _FAIRSEQ_RULES:
            if re.match(rx, k):
                out[re.sub(rx, rep, k)] = v
                break
    return out


def _cfg_get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _from_fairseq(ckpt: dict[str, Any], p: Path) -> Teacher:
    cfg = ckpt.get("cfg")
    model_cfg = _cfg_get(cfg, "model") if cfg is not None else ckpt.get("args")
    task_cfg = _cfg_get(cfg, "task") if cfg is not None else ckpt.get("args")
    if model_cfg is None:
        raise CheckpointError(f"{p}: fairseq checkpoint without a model config (cfg.model or args)")
    name = str(_cfg_get(model_cfg, "_name", _cfg_get(model_cfg, "arch", "")))
    if name and not any(t in name for t in ("hubert", "wav2vec")):
        raise CheckpointError(f"{p}: fairseq model '{name}' is not HuBERT or wav2vec 2.0")
    g = lambda k, d: _cfg_get(model_cfg, k, d)  # noqa: E731
    dim = int(g("encoder_embed_dim", 768))
    arch = HubertArch(
        conv_layers=parse_conv_layers(str(g("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))),
        conv_norm="layer_norm" if g("extractor_mode", "default") == "layer_norm" else "group_norm",
        conv_bias=bool(g("conv_bias", False)), embed_dim=dim,
        num_layers=int(g("encoder_layers", 12)), num_heads=int(g("encoder_attention_heads", 12)),
        ffn_dim=int(g("encoder_ffn_embed_dim", 3072)), pos_conv_kernel=int(g("conv_pos", 128)),
        pos_conv_groups=int(g("conv_pos_groups", 16)), layer_norm_first=bool(g("layer_norm_first", False)),
        normalize_waveform=bool(_cfg_get(task_cfg, "normalize", False)) if task_cfg is not None else False,
    )
    sd = ckpt["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: fairseq 'model' entry is not a state dict")
    return _build(arch, fairseq_to_torchaudio(sd), p, "fairseq", file_sha256(p))
