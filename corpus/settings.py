"""Settings files read against a declarative schema: a dataclass whose fields carry what a
user may write (`setting(...)`: the type, a check beyond it, the words an error uses). One
reader checks a mapping against it (unknown keys, required keys, types, ranges; sections
nested the same way) and one helper turns any complaint into an error naming the file and the
field, so that a new key is one annotated field, not another block of checks.

YAML is read with YAML 1.2's numbers: PyYAML (YAML 1.1) reads `5e-05` as a string, which a
user means as a number."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from unlearn_sweep.corpus.errors import DataError, read_text


class ConfigError(DataError):
    """A bad settings value: names the file and the field."""


class _Yaml12Loader(yaml.SafeLoader):
    """Safe loading, with floats as YAML 1.2 writes them (1e-5, 5E+3 without a dot), and a key
    given twice in one mapping refused (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.nan$"),
    list("-+0123456789."),
)


def read_yaml(path: Path | Any) -> Any:
    """A YAML file's content; a syntax error names the file and the line."""
    try:
        text = read_text(Path(path))
    except DataError as error:
        raise ConfigError(*error.parts) from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(path, f"invalid YAML{where}: {problem}") from None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    kind: type | tuple[type, ...],
    what: str,
    valid: Callable[[Any], bool] | None = None,
    required: bool = False,
    section: type | None = None,
    nullable: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field a settings file may set: `kind` the YAML types accepted (bool is never
    a number), `valid` a check beyond the type, `what` what to write, said as "expected <what>";
    `section` a nested schema read the same way (`nullable`: null stands for None, otherwise
    for the section's defaults)."""
    metadata = {
        "kind": kind,
        "what": what,
        "valid": valid,
        "required": required,
        "section": section,
        "nullable": nullable,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def read_section(path: Path, raw: Any, schema: type, where: str = "") -> dict[str, Any]:
    """The values a mapping gives for the schema's fields, each checked; nested sections are
    built (their dataclass) and fields not given keep their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {raw!r}", field=where or None)
    fields = {f.name: f for f in dataclasses.fields(schema) if "what" in f.metadata}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        valid = ", ".join(fields)
        raise ConfigError(path, f"unknown key(s) {', '.join(map(str, unknown))} (valid: {valid})", field=where or None)
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        key, rules = f"{where}.{name}" if where else name, spec.metadata
        value = raw.get(name)
        if value is None or (rules["required"] and value in ("", [])):
            if rules["required"]:
                raise ConfigError(path, "required", field=key)
            if name in raw and rules["nullable"]:
                values[name] = None
            continue
        if rules["section"] is not None:
            if not isinstance(value, dict):
                raise ConfigError(path, f"expected {rules['what']}, got {value!r}", field=key)
            values[name] = rules["section"](**read_section(path, value, rules["section"], key))
            continue
        kinds = rules["kind"] if isinstance(rules["kind"], tuple) else (rules["kind"],)
        if float in kinds and type(value) is int:
            value = float(value)
        # bool is an int to Python, never a number to a user
        wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if wrong_type or (rules["valid"] is not None and not rules["valid"](value)):
            raise ConfigError(path, f"expected {rules['what']}, got {value!r}", field=key)
        values[name] = value
    return values


@contextlib.contextmanager
def field_errors(path: Path, field: str) -> Iterator[None]:
    """Any complaint raised inside (bad data, a bad parameter, a bad value) as one error naming
    the settings file and the field that led to it."""
    try:
        yield
    except ConfigError as error:
        if str(error).startswith(f"{path}:"):
            raise
        raise ConfigError(path, str(error), field=field) from None
    except ValueError as error:
        raise ConfigError(path, str(error), field=field) from None
