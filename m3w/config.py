"""The one config loader of m3w: dataclass defaults ← YAML file(s) ← `--set KEY=VALUE`, types checked on load.

Every stage, the model and the trainer describe their settings as dataclasses; the defaults live there and only
there. `load_config(cls, path, overrides)` starts from those defaults, merges the YAML file on top, applies each
`--set a.b.c=value`, and builds the dataclass tree, checking every value against its annotation. An unknown
key, a wrong type or a value a dataclass refuses raises `ConfigError` naming the dotted key, before any work
starts (`m3w` prints it as one line).

Merging: a dataclass section merges key by key (`paragraph: {min_words: 5}` keeps the other paragraph
settings); any other value is replaced whole, a mapping field included (a YAML `datasets:` replaces the
trainer's default streams). `--set` changes exactly one leaf, creating a mapping entry if needed
(`--set datasets.extra.path=shards/x` adds a stream with default settings).

YAML is read with the YAML 1.2 core schema, not PyYAML's YAML 1.1: `3e-4` is a float (1.1: a string), `no`,
`yes`, `on` and `off` are strings (1.1: booleans; only true/false are), `010` is ten (1.1: eight) and dates
stay strings. A bool field given `no` is then a type error naming the key, not a silent False.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from m3w.errors import ConfigError

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types (null, bool, int, float) instead of 1.1's."""


_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in [
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
    ("merge", r"^<<$", ["<"]),
]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16 if text.startswith("0x") else 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """YAML text → Python values (YAML 1.2 core schema); a syntax error is a ConfigError naming the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file (a local path or a URL) as a mapping (an empty file is an empty mapping)."""
    from m3w.pipeline import io

    try:
        text = io.read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, not {_kind(data)}")
    return data


# -------------------------------------------------------------------------------------------- type checking


def _kind(value: Any) -> str:
    """How a value reads in an error message."""
    names = {
        bool: "a bool",
        int: "an int",
        float: "a float",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _describe(hint: Any) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "anything"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def _type_error(where: str, hint: Any, value: Any) -> ConfigError:
    shown = repr(value) if not isinstance(value, dict | list) else _kind(value)
    return ConfigError(f"{where}: expected {_describe(hint)}, got {shown} ({_kind(value)})")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against the annotation `hint` (and converted where lossless: int → float, list → tuple,
    mapping → dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except ConfigError:
                continue
        raise _type_error(where, hint, value)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _type_error(where, hint, value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, where)
        raise _type_error(where, hint, value)
    if origin is list or hint is list:
        if not isinstance(value, list | tuple):
            raise _type_error(where, hint, value)
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or hint is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(where, hint, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value)))
        )
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _type_error(where, hint, value)
        value_hint = args[1] if args else Any
        return {str(k): _convert(v, value_hint, _join(where, k)) for k, v in value.items()}
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _type_error(where, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(where, hint, value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _type_error(where, hint, value)
    raise TypeError(f"{where}: m3w.config cannot check the annotation {hint!r}")  # a bug in a config class


def _fields(cls: type) -> dict[str, Any]:
    """Init fields of a dataclass → their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls: type, key: Any, where: str) -> ConfigError:
    known = sorted(_fields(cls))
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{_join(where, key)}: unknown key ({hint}known: {', '.join(known)})")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build a dataclass tree from a mapping, checking every key and type. Missing keys keep their defaults."""
    if not isinstance(data or {}, dict):
        raise _type_error(where or cls.__name__, cls, data)
    fields = _fields(cls)
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _convert(value, fields[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # __post_init__ refusing a value
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    """Check a partial mapping of `cls` fields (overrides applied later, e.g. to a model preset) without
    building it: unknown keys and wrong types fail now."""
    fields = _fields(cls)
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, where)
        _convert(value, fields[key], _join(where, key))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------ layers, --set


def _section_type(hint: Any) -> Any:
    """The dataclass a hint names (also through `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def merge(cls: type, base: dict[str, Any], layer: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`layer` on top of `base` (both mappings of `cls`): dataclass sections merge key by key, other values
    are replaced whole."""
    fields = _fields(cls)
    out = dict(base)
    for key, value in layer.items():
        if key not in fields:
            raise _unknown_key(cls, key, where)
        section = _section_type(fields[key])
        if section is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(section, out[key], value, _join(where, key))
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` → (["optim", "lr"], 0.0003). The value is YAML (1.2 core schema): `[a, b]` is a list."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set paragraph.min_words=5")
    return path, parse_yaml(raw, f"--set {key.strip()}")


def apply_override(cls: type, data: dict[str, Any], path: list[str], value: Any, where: str = "") -> None:
    """Set one leaf of the mapping `data` (of dataclass `cls`), creating mapping entries on the way."""
    node, hint = data, cls
    for i, part in enumerate(path):
        last = i == len(path) - 1
        section = _section_type(hint)
        if section is not None:
            fields = _fields(section)
            if part not in fields:
                raise _unknown_key(section, part, where)
            hint = fields[part]
        elif hint is Any or typing.get_origin(hint) is dict or hint is dict:
            args = typing.get_args(hint)
            hint = args[1] if args else Any
        else:
            raise ConfigError(
                f"{where}: is {_describe(hint)}, it has no key {part!r} (--set {'.'.join(path)})"
            )
        where = _join(where, part)
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] | None = (),
    layers: Sequence[dict[str, Any]] = (),
    where: str = "",
) -> T:
    """Defaults of `cls` ← the YAML file at `path` ← each mapping of `layers` ← each `--set` override.
    `where` prefixes the keys named in errors (e.g. "filter.options" for a stage config inside a build)."""
    data = to_dict(cls())
    if path is not None:
        layer = read_yaml(path)
        try:
            data = merge(cls, data, layer, where)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for layer in layers:
        if not isinstance(layer, dict):
            raise _type_error(where or cls.__name__, cls, layer)
        data = merge(cls, data, layer, where)
    for text in overrides or ():
        apply_override(cls, data, *parse_override(text), where)
    return from_dict(cls, data, where)


# Which dataclass configures which command (`m3w config show STAGE`, stage configs inside `m3w build`).
CONFIG_CLASSES = {
    "extract": "m3w.pipeline.extract:ExtractConfig",
    "filter": "m3w.pipeline.filters.config:FilterConfig",
    "images": "m3w.pipeline.images:ImagesConfig",
    "shards": "m3w.pipeline.shards:ShardsConfig",
    "build": "m3w.pipeline.build:BuildConfig",
    "model": "m3w.model.config:FlamingoConfig",
    "train": "m3w.trainer.config:TrainConfig",
}


def config_class(stage: str) -> type:
    import importlib

    module, name = CONFIG_CLASSES[stage].split(":")
    return getattr(importlib.import_module(module), name)


# -------------------------------------------------------------------------------------------- YAML output


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field in the dataclass source: the comment lines right above it and the one after
    it on its line. Written next to the key by `to_yaml`, so a generated YAML documents itself."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = set(_fields(cls))
    comments: dict[str, str] = {}
    above: list[str] = []
    indent = None
    for line in lines[1:]:
        stripped = line.strip()
        current = len(line) - len(line.lstrip())
        if indent is not None and stripped and current < indent:
            break
        if stripped.startswith("#") and (indent is None or current == indent):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)(\w+)\s*:", line)
        if match and match.group(2) in names and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            trailing = re.search(r"\s#\s?(.*)$", line.split("=", 1)[-1]) if "#" in line else None
            parts = [t for t in (" ".join(above), trailing.group(1).strip() if trailing else "") if t]
            text = (" " if parts and parts[0][-1] in ".:;!?" else "; ").join(parts)
            if text:
                comments[match.group(2)] = text
            above = []
        elif not stripped or (indent is not None and current == indent):
            above = []
        if stripped.startswith("def "):
            break
    return comments


def _scalar(value: Any, flow: bool = True) -> str:
    text = yaml.safe_dump(value, default_flow_style=flow, width=10**9, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _emit(cls: type | None, data: dict[str, Any], indent: int, out: list[str]) -> None:
    pad = " " * indent
    fields = _fields(cls) if cls is not None else {}
    comments = field_comments(cls) if cls is not None else {}
    for key, value in data.items():
        hint = fields.get(key, Any)
        comment = f"  # {comments[key]}" if key in comments else ""
        section = _section_type(hint)
        args = typing.get_args(hint)
        if (
            not comment
            and section is not None
            and section.__doc__
            and not section.__doc__.startswith(section.__name__)
        ):
            comment = f"  # {' '.join(section.__doc__.split(chr(10) * 2)[0].split())}"
        if section is not None and isinstance(value, dict):
            out.append(f"{pad}{key}:{comment}")
            _emit(section, value, indent + 2, out)
        elif isinstance(value, dict) and value and typing.get_origin(hint) is dict:
            out.append(f"{pad}{key}:{comment}")
            item_cls = args[1] if args and dataclasses.is_dataclass(args[1]) else None
            for name, item in value.items():
                if item_cls is not None:
                    out.append(f"{pad}  {name}:")
                    _emit(item_cls, item, indent + 4, out)
                else:
                    out.append(f"{pad}  {name}: {_scalar(_plain(item))}")
        elif isinstance(value, list | tuple) and len(_scalar(_plain(value))) > 60:
            out.append(f"{pad}{key}:{comment}")
            out.extend(f"{pad}  - {_scalar(_plain(v), flow=False)}" for v in value)
        else:
            out.append(f"{pad}{key}: {_scalar(_plain(value))}{comment}")


def to_yaml(config: Any, header: str = "") -> str:
    """A config as YAML that `load_config` reads back to the same config, each key with its source comment."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit(type(config), to_dict(config), 0, out)
    return "\n".join(out) + "\n"
