"""Settings as a person types them: typed values for the settings objects, with errors that name the setting.

``--set train.lr=1e-3`` must mean 0.001 (YAML 1.1 reads ``1e-3`` as a string: it wants ``1.0e-3``), and
``--set train.iterations=many`` must fail at once, saying which setting expects what, not deep inside torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str):
    """A value from the command line: numbers as people write them (``1e-3``, ``5.``, ``.5``, ``1_000``), then
    YAML for the rest (``true``, ``null``, ``[1, 2]``, ``{grid: [1, 2]}``, strings)."""
    import yaml

    n = text.strip().replace("_", "")
    if _NUMBER.match(n):
        return int(n) if re.fullmatch(r"[+-]?\d+", n) else float(n)
    return yaml.safe_load(text)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list",
               list: "a list", dict: "a mapping"}


def _coerce(section: str, name: str, value, want):
    """``value`` as type ``want`` (int, float, bool, str, tuple, Optional of those) or a ValueError."""
    origin = typing.get_origin(want)
    args = typing.get_args(want)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        want = next(a for a in args if a is not type(None))
        origin = typing.get_origin(want)
    base = origin or want
    where = f"{section}.{name}" if section else name

    def fail():
        raise ValueError(f"setting {where} expects {_TYPE_WORDS.get(base, getattr(base, '__name__', str(base)))}, "
                         f"got {value!r} ({type(value).__name__}); e.g. --set {where}="
                         f"{ {int: '100', float: '1e-3', bool: 'true', str: 'text'}.get(base, '[1, 2]') }")

    if base in (int, float) and isinstance(value, str) and _NUMBER.match(value.strip().replace("_", "")):
        value = parse_value(value)  # YAML files read 1e-3 as a string too
    if base is bool:
        if isinstance(value, bool):
            return value
        fail()
    if base is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e3 steps is 1000 steps
        fail()
    if base is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        fail()
    if base is str:
        if isinstance(value, str):
            return value
        fail()
    if base in (tuple, list):
        if isinstance(value, list | tuple):
            return base(value)
        fail()
    return value


def typed_dataclass(cls, d: dict, section: str):
    """``cls(**d)`` with every value checked (and converted where exact) against the field's annotation;
    unknown names are an error that lists the known ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {section} setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return cls(**{k: _coerce(section, k, v, hints[k]) for k, v in d.items()})
