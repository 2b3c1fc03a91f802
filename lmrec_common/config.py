"""Typed job configs: a dataclass per job, one YAML per job, dotted ``key=value`` overrides.

    cfg = load_config(DataPrepConfig, "configs/data_prep/sample.yaml", ["num_proc=4", "columns.user_id=uid"])

Rules (STYLE.md #2): unknown keys are errors that name the key and the file; values are coerced
to the field's declared type (``"4"`` -> 4 for an int field) and a value that cannot be coerced is
an error naming the key; the resolved config can be dumped back to YAML and is saved beside every
output (``save_config``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be turned into the typed config."""


class _Raw(str):
    """An override value from the command line, still unparsed: coerced by the field's type."""


def _yaml_value(value: Any) -> Any:
    if isinstance(value, _Raw):
        try:
            return yaml.safe_load(str(value)) if value != "" else ""
        except yaml.YAMLError:
            return str(value)
    return value


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _yaml_value(value)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.lower() in ("null", "none", "~"))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if _is_dataclass_type(tp):
        value = _yaml_value(value)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if value is None:
            return [] if (origin or tp) is list else ()
        if isinstance(value, _Raw):
            # key=[a,b] (YAML) or key=a,b,c on the command line
            value = _yaml_value(value) if value.startswith("[") else [_Raw(v) for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if (origin or tp) is list else tuple(out)
    if origin is dict or tp is dict:
        value = _yaml_value(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if isinstance(value, _Raw) and value not in args:
            value = _yaml_value(value)
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return str(value) if isinstance(value, _Raw) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if value is None:
            raise ConfigError(f"{key}: expected a string, got null")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value) if not isinstance(value, _Raw) else str.__str__(value)
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys of {prefix or cls.__name__ + '.'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = _Raw(raw)
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a
    duplicated section would drop the first). Merge keys (``<<``) are not duplicates."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise ConfigError(f"config file {p}: key {e.key!r} appears twice in one mapping (lines {e.first} and {e.again}); "
                          "YAML would keep only the last: merge them into one") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


BASE_KEY = "base"


def read_config_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its ``base:`` chain resolved: ``base: other.yaml`` (relative to the file naming it) is read
    first and this file's keys are merged over it, section by section (a list or a value replaces the base's).
    A base may itself name a base; a cycle is an error naming the files."""
    p = Path(path).resolve()
    if p in _chain:
        raise ConfigError(f"config file {p}: base chain loops back ({' -> '.join(str(c) for c in (*_chain, p))})")
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: {BASE_KEY} must be the path of another config file, got {base!r}")
    bp = Path(base) if Path(base).is_absolute() else Path(path).parent / base
    if not bp.is_file():
        raise ConfigError(f"config file {path}: {BASE_KEY}: {base} does not exist (looked for {bp})")
    return _merge(read_config_tree(bp, (*_chain, p)), data)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional; its ``base:`` chain resolved) plus dotted overrides. Errors name file
    and key."""
    data = read_config_tree(path) if path else {}
    data = _merge(data, parse_overrides(list(overrides or [])))
    try:
        return _build(cls, data)
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        if path and overrides:  # the file alone is fine: the mistake is in a key=value of the command line
            try:
                _build(cls, read_config_tree(path))
                where = f" (in a key=value given on the command line; {path} itself is fine)"
            except ConfigError:
                pass
        raise ConfigError(f"{e}{where}") from None


def config_from_dict(cls: type[T], data: dict) -> T:
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    from lmrec_common.publish import atomic_write_text

    atomic_write_text(path, dump_yaml(cfg))


def _field_notes(cls: type) -> dict[str, str]:
    """field name -> its comment in the dataclass source: the inline ``# ...`` or, failing that, the comment lines just
    above it (base classes first, so that a subclass's note wins)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in src.splitlines()[1:]:
            s = line.strip()
            if s.startswith("#"):
                above.append(s.lstrip("#").strip(" -"))
                continue
            m = re.match(r"([A-Za-z_]\w*)\s*:\s*[^=]", s)
            if m and line.startswith("    ") and not line.startswith("     "):
                inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                note = inline or " ".join(a for a in above if a)
                if note:
                    notes[m.group(1)] = note
            above = []
    return notes


def config_help(cls: type, prog: str) -> str:
    """``--help`` text: every key of ``cls`` (nested sections as ``section.key``) with its default and meaning."""
    out = [f"usage: {prog} [--config FILE.yaml] [key=value ...]", "",
           "A YAML file sets keys (a key 'base: other.yaml' starts from another file); key=value arguments override",
           "it, nested keys as section.key=value. Keys, defaults and meaning:", ""]

    def walk(c: type, prefix: str) -> None:
        notes = _field_notes(c)
        for f in dataclasses.fields(c):
            if f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            if dataclasses.is_dataclass(default):
                out.append(f"  {prefix}{f.name}:" + (f"  # {notes[f.name]}" if f.name in notes else ""))
                walk(type(default), f"{prefix}{f.name}.")
                continue
            shown = json.dumps(default) if isinstance(default, (str, list, dict)) else repr(default)
            out.append(f"  {prefix}{f.name} = {shown}" + (f"  # {notes[f.name]}" if f.name in notes else ""))

    walk(cls, "")
    return "\n".join(out)


def cli_args(argv: list[str], cls: type | None = None, prog: str = "") -> tuple[str | None, list[str]]:
    """Split ``--config X key=value ...`` (as used by every ``__main__``); ``-h``/``--help`` prints the keys of
    ``cls`` with their defaults and meaning (config_help) and exits 0."""
    config = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            config = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            if cls is not None:
                try:
                    print(config_help(cls, prog or "python -m <stage>"), flush=True)
                except BrokenPipeError:  # `--help | head`: the reader left; not an error
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0)
        else:
            rest.append(a)
        i += 1
    return config, rest
