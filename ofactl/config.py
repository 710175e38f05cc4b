"""Typed configs, YAML presets and ``--set key=value`` overrides.

A preset is a plain YAML mapping with one section per command (``synth:``, ``distill:`` ...)
and an optional ``description``. A command reads its own section into a frozen-by-convention
dataclass; unknown keys and wrong types fail with the key path, the file and the expected type.

    >>> cfg = load_config(SynthConfig, "synth", "synth-tiny", ["seed=3"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from ofactl.atomic import write_text
from ofactl.errors import ConfigError

T = TypeVar("T")

_TOP_LEVEL_EXTRA = {"description"}


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: only true/false are booleans.

    Under YAML 1.1 rules ``[yes, no, on, off]`` (a keyword list) would load as booleans.
    No tags beyond the safe ones are resolved, exactly as with ``yaml.safe_load``.
    """


_SafeLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def safe_load(text: str) -> Any:
    """Parse YAML with the safe loader above (no arbitrary objects, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_SafeLoader)


# --------------------------------------------------------------------------- preset files
def preset_dirs() -> list[Path]:
    """Folders searched for presets by name: the checkout's ``presets/`` or the installed copy."""
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / "presets", here / "_presets") if d.is_dir()]


def available_presets() -> list[str]:
    """Names of every preset found (without ``.yaml``), sorted."""
    names: set[str] = set()
    for d in preset_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_preset(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``synth-tiny``) or a YAML path to an existing file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            what = "is a folder, not a YAML file" if p.is_dir() else "not found"
            raise ConfigError(f"config file {p} {what}")
        return p
    for d in preset_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(
        f"unknown preset '{name_or_path}'; available: {', '.join(available_presets()) or 'none'}"
    )


def load_yaml(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` a mapping; syntax errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def run_settings(run: Path) -> tuple[str, dict[str, Any]]:
    """The command whose settings a run folder's config.yaml holds (distill, pretrain, sweep or
    adapt) and those settings; ("", {}) for a folder without one, or with one that is unreadable."""
    try:
        saved = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    except ConfigError:
        return "", {}
    return next(((s, saved[s]) for s in ("distill", "pretrain", "sweep", "adapt") if isinstance(saved.get(s), dict)),
                ("", {}))


# --------------------------------------------------------------------------- typed building
def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into a ConfigError by :func:`_coerce`)."""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples etc).

    A mismatch is one ``ConfigError`` naming the key, where the value came from, the expected
    type and the value.
    """
    try:
        return _convert(value, tp, key, source)
    except _Mismatch:
        shown = repr(value) if not isinstance(value, dict) else "a mapping"
        raise ConfigError(
            f"{key} in {source}: expected {_type_name(tp)}, got {type(value).__name__} {shown}"
        ) from None


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """:func:`_coerce` by the kind of annotation; raises ``_Mismatch`` (or a nested key's error)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, get_args(tp), key, source)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, source, prefix=key + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _convert_sequence(value, tp, key, source)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        _, vt = (get_args(tp) + (Any, Any))[:2]
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    return _convert_scalar(value, tp)


def _convert_union(value: Any, args: tuple[Any, ...], key: str, source: str) -> Any:
    """The first member of the union that accepts ``value`` (None for an optional)."""
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, key, source)
        except ConfigError:
            continue
    raise _Mismatch


def _convert_sequence(value: Any, tp: Any, key: str, source: str) -> tuple[Any, ...]:
    """A list or tuple as a tuple, each item checked (fixed-length tuples item by item)."""
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    args = get_args(tp)
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    return tuple(_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))


def _convert_scalar(value: Any, tp: Any) -> Any:
    """bool, int, float (ints widen), str (numbers become text), or an instance of ``tp``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and isinstance(value, int):
        return value
    if tp is float and number:
        return float(value)
    if tp is str and (isinstance(value, str) or number):
        return value if isinstance(value, str) else str(value)
    if tp not in (bool, int, float, str) and isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in names:
            raise ConfigError(
                f"unknown key '{prefix}{k}' in {source}; valid keys: {', '.join(sorted(names))}"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{source}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return obj


def build_config(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    return _build(cls, data, source)


# --------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=2e-4"`` -> (["optim", "lr"], 0.0002). Values are parsed as YAML scalars."""
    path, raw = _split_override(item)
    return path, _scalar(raw)


def _split_override(item: str) -> tuple[list[str], str]:
    """``"optim.lr=2e-4"`` -> (["optim", "lr"], "2e-4"): the dotted key and the text after ``=``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set optim.lr=2e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    return key.split("."), raw


def _scalar(raw: str) -> Any:
    """The YAML scalar ``raw`` stands for; text that is not YAML stays text."""
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "2e-4" as a string (no dot); numbers like that are what users mean.
    if isinstance(value, str) and any(c in value for c in "eE."):
        with contextlib.suppress(ValueError):
            value = float(value)
    return value


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``--set`` overrides applied; unknown keys fail here.

    A key whose type is ``str`` takes the text after ``=`` as it is (a path with ``#`` or
    ``: `` is not YAML), except ``null`` for an optional one and ``""`` for the empty text.
    """
    out: dict[str, Any] = _deepcopy(data)
    for item in overrides:
        path, raw = _split_override(item)
        field_tp = _field_type(cls, path, f"--set {item}")
        text, raw = raw, raw.strip()
        if _unwrap_optional(field_tp) is str and not (raw == "null" and field_tp is not str):
            value: Any = "" if raw in ('""', "''") else raw
        else:
            value = _scalar(text)
        _set_path(out, path, value)
    return out


def _field_type(cls: type, path: Sequence[str], where: str) -> Any:
    """The annotation of the dotted field ``path`` of ``cls``; unknown keys fail naming ``where``."""
    tp: Any = cls
    field_tp: Any = None
    for part in path:
        tp = _unwrap_optional(tp if field_tp is None else field_tp)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp) and part in {f.name for f in dataclasses.fields(tp)}):
            raise ConfigError(f"unknown key '{'.'.join(path)}' in {where}")
        field_tp = _hints(tp)[part]
    return field_tp


def _set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """``data[a][b]... = value`` for ``path`` [a, b, ...], making the inner mappings it needs."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag's typed value for one config key, applied after ``--set``.

    ``Flag("rates", "--rate", (1.5,))``: errors name the flag as typed (``--rate 1.5: ...``),
    and the value never goes through YAML text. ``None`` means the flag was not given.
    """

    key: str
    name: str
    value: Any
    typed: str = ""  # how it was typed, when several flags feed one key (--rate and --frame-ms)

    def shown(self) -> str:
        """The flag as a user would have typed it."""
        if self.typed:
            return self.typed
        v = self.value
        if isinstance(v, (list, tuple)):
            return " ".join(f"{self.name} {x}" for x in v)
        return f"{self.name} {v}"


def parse_numbers(texts: Sequence[str], flag: str) -> tuple[float, ...]:
    """The numbers a flag was given, each value a comma-separated list, the flag possibly repeated:
    ``--rate 1,0.5 --rate 0.25`` -> (1.0, 0.5, 0.25); anything else fails naming the flag."""
    out: list[float] = []
    for text in texts:
        try:
            out += [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text}: expected numbers, comma-separated or with {flag} repeated, "
                              "e.g. 1,0.5,0.25") from None
    return tuple(out)


def _apply_flags(cls: type, data: dict[str, Any], flags: Sequence[Flag]) -> dict[str, Any]:
    """A copy of ``data`` with each flag's value checked against its key's type and set."""
    out: dict[str, Any] = _deepcopy(data)
    for f in flags:
        path = f.key.split(".")
        tp = _field_type(cls, path, f.name)
        value = _coerce(list(f.value) if isinstance(f.value, tuple) else f.value, tp, f.key, f.shown())
        _set_path(out, path, value)
    return out


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# --------------------------------------------------------------------------- entry points
def load_config(
    cls: type[T],
    section: str,
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    flags: Sequence[Flag] = (),
    derived: Callable[[dict[str, Any]], Sequence[Flag]] | None = None,
) -> T:
    """Defaults <- preset section <- ``--set`` overrides <- typed flags, validated into ``cls``.

    ``derived``: flags whose keys depend on the settings given before them, read from the raw
    settings with the other flags applied (``distill --rate``: an avgpool student's pooling
    rate, another's fixed rate). Only the result must be valid: ``--set student.compressor=none``
    needs the fixed rate 1 that ``--rate 1`` gives it. An error names where the bad value came
    from: the preset file, the ``--set`` items, or the one flag that makes the config invalid
    (``--rate 1.5: rate 1.5 is outside (0, 1] ...``).
    """
    data, source = _preset_data(cls, section, preset)
    if overrides:
        data = apply_overrides(cls, data, overrides)
        source = f"{source} with --set {' '.join(overrides)}"
    given = [f for f in flags if f.value is not None]
    if derived is not None:
        given += derived(_apply_flags(cls, data, given))
    if not given:
        return _build(cls, data, source)
    try:
        return _build(cls, _apply_flags(cls, data, given), " ".join(f.shown() for f in given))
    except ConfigError:
        _build(cls, data, source)  # preset and --set errors are reported against them, not a flag
        for f in given:  # the flag that is wrong on its own is named alone
            _build(cls, _apply_flags(cls, data, [f]), f.shown())
        raise


def _preset_data(cls: type, section: str, preset: str | Path | None) -> tuple[dict[str, Any], str]:
    """The preset's section for ``cls`` (checked against the file) and the source to name in errors."""
    if preset is None:
        return {}, "defaults"
    path = find_preset(preset)
    doc = load_yaml(path)
    known = _TOP_LEVEL_EXTRA | set(COMMAND_SECTIONS)
    for k in doc:
        if k not in known:
            raise ConfigError(f"unknown section '{k}' in {path}; valid sections: {', '.join(sorted(known))}")
    if section not in doc:
        present = sorted(k for k in doc if k in COMMAND_SECTIONS)
        raise ConfigError(f"{path} has no '{section}' section (it has: {', '.join(present) or 'none'})")
    sec = doc[section] or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"section '{section}' in {path}: expected a mapping")
    _build(cls, sec, str(path))  # report preset errors against the file, before overrides
    return sec, str(path)


def doc_sha(doc: Any) -> str:
    """A short SHA-256 (16 hex digits) of a JSON-able document, keys sorted (other values as
    ``str``): the identity of settings and inputs that reuse checks compare."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_resolved(cfg: Any, section: str, path: Path) -> Path:
    """Write the resolved config next to a run's outputs (loadable again with ``-c path``)."""
    return write_text(path, yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False))


# Sections a preset may hold and their config classes, named as "module:Class" so that
# importing this module stays cheap: a class is imported only when asked for.
SECTION_CLASSES = {
    "synth": "ofactl.synth:SynthConfig",
    "distill": "ofactl.distill:DistillConfig",
    "pretrain": "ofactl.pretrain:PretrainConfig",
    "extract": "ofactl.extract:ExtractConfig",
    "sweep": "ofactl.sweep:SweepConfig",
    "adapt": "ofactl.adapt:AdaptConfig",
    "quickstart": "ofactl.quickstart:QuickstartConfig",
}
COMMAND_SECTIONS = tuple(SECTION_CLASSES)


def section_class(section: str) -> type:
    """The config class of a preset section (``distill`` -> ``DistillConfig``), imported on demand."""
    import importlib

    module, _, name = SECTION_CLASSES[section].partition(":")
    return getattr(importlib.import_module(module), name)


def field_help(cls: type) -> dict[str, str]:
    """The meaning of each field of a config dataclass, read from the class's source: the
    comment on the field's line (and the comment lines right below it, which continue it), or
    else the comment lines right above the field. A blank line ends a comment."""
    import inspect
    import io
    import tokenize

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    current: str | None = None  # the field on the line being read
    trailing: str | None = None  # the last field with a comment on its line, still continuing
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current is not None:
                out[current], trailing = text, current
            elif trailing is not None:
                out[trailing] += " " + text
            else:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and current is None:
            current, trailing = tok.string, None
            if above:
                out[current] = " ".join(above)
        elif tok.type == tokenize.NEWLINE:
            current, above = None, []
        elif tok.type == tokenize.NL and not tok.line.strip():
            above, trailing = [], None
    return out


def _leaf_keys(cls: type, defaults: dict[str, Any], prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, meaning) of every leaf field of ``cls``, in field order
    (nested sections inline)."""
    hints, meaning, out = _hints(cls), field_help(cls), []
    for f in dataclasses.fields(cls):
        sub = _unwrap_optional(hints[f.name])
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out += _leaf_keys(sub, defaults[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", _type_name(hints[f.name]), defaults[f.name], meaning.get(f.name, "")))
    return out


def keys_markdown() -> str:
    """Every key of every section with its type and built-in default (docs/presets.md)."""
    out = [KEYS_BEGIN, ""]
    for section in COMMAND_SECTIONS:
        cls = section_class(section)
        out += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k, t, v, meaning in _leaf_keys(cls, to_dict(cls())):
            shown = json.dumps(v) if not isinstance(v, str) else (f"`{v}`" if v else '""')
            # a bar (choices, "a | b") would end the table cell
            t, meaning = t.replace("Ellipsis", "...").replace("|", "\\|"), meaning.replace("|", "\\|")
            out.append(f"| `{k}` | {t} | {shown} | {meaning} |")
        out.append("")
    return "\n".join(out + [KEYS_END])


KEYS_BEGIN = "<!-- keys: generated by `python -m ofactl.cli_docs`; tests check it is current -->"
KEYS_END = "<!-- end of generated keys -->"
