"""Strict YAML -> dataclass configuration.

Every section of a run config is a dataclass; this module turns a YAML mapping into
those dataclasses and rejects anything it does not understand: an unknown key (with
the nearest valid name), a wrong type, a value out of range, or a stage whose `from`
names no earlier stage. Errors are `ConfigError`s carrying the file and the dotted key,
raised before any work starts.

Field metadata understood by the loader:
  help      one-line meaning (the config reference docs/config.md is generated from it:
            `python -m pipeline.reference`)
  key       the YAML key when it differs from the field name (`from` -> `from_`)
  min/max   inclusive bounds;  gt/lt  exclusive bounds
  limit     an inclusive upper bound that guards resources, not meaning (epochs, batch and
            image sizes: a typo such as 1e20 must not hang or exhaust memory)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from . import yamlload
from .errors import UsageError, did_you_mean, show_value

INT_LIMIT = 2**63  # every integer of a config is a signed 64-bit one
MAX_EPOCHS = 100_000  # bound of every epoch count (a typo such as 1e20 would never end)
MAX_BATCH = 1 << 20  # bound of every batch size
MAX_IMAGE_SIZE = 8192  # bound of every image side, in pixels


class ConfigError(UsageError, ValueError):
    """A user mistake in a config file or an override: one line, names file and key."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}


class Invalid(Exception):
    """Raised by a dataclass's `validate()`: `key` is relative to that section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class Loader:
    """Converts plain YAML data into typed dataclasses, remembering the source file."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source}: {key}: {message}")

    def load(self, cls: type, data: Any, key: str) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(key or "(top level)", f"expected a mapping, got {_show(data)}")
        known = _fields(cls)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in known:
                hint = did_you_mean(name, known, cutoff=0.5)
                valid = ", ".join(sorted(known))
                self.fail(sub, f"unknown key{hint}; valid keys: {valid}")
            f = known[name]
            if "limit" in f.metadata:  # a number beyond it is named with it, not as an int64
                _check_range(self, f, value, sub)
            kwargs[f.name] = self.convert(hints[f.name], value, sub)
            _check_range(self, f, kwargs[f.name], sub)
        try:
            obj = cls(**kwargs)
        except TypeError:  # a required field (one without a default) is missing
            missing = [yaml_key(f) for f in dataclasses.fields(cls)
                       if f.init and f.name not in kwargs and f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING]
            self.fail(key or "(top level)", f"missing required key(s) {missing}")
        validate = getattr(obj, "validate", None)
        if validate is not None:
            try:
                validate()
            except Invalid as err:
                self.fail(f"{key}.{err.key}" if key else err.key, err.message)
        return obj

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            errors = []
            # the value's own type first (1.0 stays a float in `int | float`), then scalars
            # before dataclasses so a number does not fail as "expected a mapping"
            ordered = sorted(args, key=lambda a: (dataclasses.is_dataclass(a),
                                                  a is not type(value)))
            for arg in ordered:
                if arg is type(None):
                    continue
                if dataclasses.is_dataclass(arg) and not isinstance(value, dict):
                    continue
                try:
                    return self.convert(arg, value, key)
                except ConfigError as err:
                    errors.append(err)
            if len(errors) == 1:
                raise errors[0]
            self.fail(key, f"expected {_type_name(tp)}, got {_show(value)}")
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                hint = did_you_mean(value, choices)
                self.fail(key, f"expected one of {list(choices)}, got {_show(value)}{hint}")
            return value
        if origin is list:
            (item,) = typing.get_args(tp)
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                self.fail(key, f"expected {_type_name(tp)}, got {_show(value)}")
            return [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            _, item = typing.get_args(tp)
            if not isinstance(value, dict):
                self.fail(key, f"expected {_type_name(tp)}, got {_show(value)}")
            return {str(k): self.convert(item, v, f"{key}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.load(tp, value, key)
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(key, f"expected true/false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if not (isinstance(value, float) and value.is_integer()):
                    self.fail(key, f"expected an integer, got {_show(value)}")
                value = int(value)
            if not -INT_LIMIT <= value < INT_LIMIT:  # what torch, numpy and files can hold
                self.fail(key, f"expected an integer below 2^63, got {_show(value)}")
            return value
        if tp is float:
            return self._number(value, key)
        if tp is str:
            if not isinstance(value, str):
                self.fail(key, f"expected a string, got {_show(value)}")
            if "\x00" in value:
                self.fail(key, f"contains a NUL character: {_show(value)}")
            return value
        raise TypeError(f"config loader: unsupported type {tp!r} at {key}")

    def _number(self, value: Any, key: str) -> float:
        """A finite float: every number key is checked here, so NaN (which passes every
        range comparison) and infinities never reach a range check or a schedule."""
        if isinstance(value, str):
            try:  # YAML reads "5e-4" as a string; accept it as a number
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            self.fail(key, f"expected a finite number, got {_show(value)}")
        return number


def _show(value: Any) -> str:
    return show_value(value)


def _check_range(loader: Loader, f: dataclasses.Field, value: Any, key: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return
        md = f.metadata
        bounds = []
        if "min" in md and v < md["min"]:
            bounds.append(f">= {md['min']}")
        if "max" in md and v > md["max"]:
            bounds.append(f"<= {md['max']}")
        if "gt" in md and v <= md["gt"]:
            bounds.append(f"> {md['gt']}")
        if "lt" in md and v >= md["lt"]:
            bounds.append(f"< {md['lt']}")
        kind = "an integer" if isinstance(v, int) else "a number"
        if bounds:
            loader.fail(key, f"expected {kind} {_describe_range(md)}, got {_show(v)}")
        if "limit" in md and v > md["limit"]:
            loader.fail(key, f"expected {kind} <= {md['limit']:,} (the most this key "
                        f"allows), got {_show(v)}")


def _describe_range(md: dict) -> str:
    has_lo = "min" in md or "gt" in md
    has_hi = "max" in md or "lt" in md
    if has_lo and not has_hi:
        return f">= {md['min']}" if "min" in md else f"> {md['gt']}"
    if has_hi and not has_lo:
        return f"<= {md['max']}" if "max" in md else f"< {md['lt']}"
    lo = f"[{md['min']}" if "min" in md else f"({md['gt']}"
    hi = f"{md['max']}]" if "max" in md else f"{md['lt']})"
    return f"in {lo}, {hi}"


def opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with help text and loader metadata; lists/dicts/dataclasses copied."""
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _copy(d: Any) -> Any:
    return copy.deepcopy(d)


# --------------------------------------------------------------------------- raw YAML


def parse_yaml(text: str, source: str | Path) -> Any:
    """YAML text -> data (aliases bounded, duplicate keys refused: `yamlload`); a syntax
    error is one ConfigError line naming `source`, the line and the column."""
    try:
        return yamlload.load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None


def read_text(path: Path, what: str = "config file") -> str:
    """A UTF-8 text file's content; a missing, unreadable or non-UTF-8 file is one
    ConfigError line naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                          f"{err.start}); a {what} is UTF-8 YAML") from None


def read_yaml(path: Path, _chain: tuple[tuple[Path, str], ...] = ()) -> dict:
    """Read a YAML mapping; follow `base:` (relative to the file) with a deep merge. A
    `base:` chain that comes back to a file already in it is refused, naming the chain."""
    real = Path(os.path.realpath(path))
    if real in [r for r, _ in _chain]:
        chain = " -> ".join([shown for _, shown in _chain] + [str(path)])
        raise ConfigError(f"{_chain[-1][1]}: base: {chain} is a cycle of base files")
    data = parse_yaml(read_text(path), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping, got {_show(data)}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base or "\x00" in base:
            raise ConfigError(f"{path}: base: expected a file name, got {_show(base)}")
        parent = read_yaml(path.parent / base, (*_chain, (real, str(path))))
        data = deep_merge(parent, data)
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # a stage that changes its type replaces the base's spec instead of merging
            if "type" in v and out[k].get("type") not in (None, v["type"]):
                out[k] = v
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: --set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yamlload.load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: --set {key}: value {_show(raw)} is not valid "
                              "YAML") from None
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{source}: --set {key}: empty key segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                dotted = ".".join(parts[: i + 1])
                raise ConfigError(f"{source}: --set {key}: {dotted} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return data


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> plain dict using YAML key names (for writing config.yaml)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {yaml_key(f): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
