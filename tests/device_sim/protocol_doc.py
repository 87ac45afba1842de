"""The JSON schemas embedded in ``docs/protocol.md``, and a validator for them.

Each schema sits in a fenced ``json`` block right after a marker line
``<!-- schema:ModelName -->``. ``validate`` implements the part of JSON
Schema (draft 2020-12) that pydantic emits for the protocol models, and
raises on any keyword outside it, so a schema it cannot check fails loudly
instead of passing.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from otaflow.manifest import Manifest
from otaflow.protocol import (
    CancelCommand,
    HealthReport,
    InstallCommand,
    PresenceReport,
    RollbackCommand,
    StatusReport,
)
from otaflow.trust import ReleaseKeySet, RootKeySet

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
SCHEMA_BLOCK = re.compile(
    r"<!-- schema:(?P<name>\w+) -->\n```json\n(?P<body>.*?)\n```", re.DOTALL
)
DOCUMENTED_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        InstallCommand,
        RollbackCommand,
        CancelCommand,
        StatusReport,
        HealthReport,
        PresenceReport,
        Manifest,
        RootKeySet,
        ReleaseKeySet,
    )
}
# Keywords that only annotate; they never make an instance invalid.
ANNOTATIONS = frozenset({"title", "description", "default", "$defs"})


class SchemaViolationError(AssertionError):
    """An instance does not match a schema; the message gives the JSON path."""


def load_doc_schemas(path: Path = DOC_PATH) -> dict[str, dict[str, Any]]:
    return {
        match["name"]: json.loads(match["body"])
        for match in SCHEMA_BLOCK.finditer(path.read_text())
    }


def render_doc(text: str) -> str:
    """Return ``text`` with every schema block replaced by the model's schema."""

    def replace(match: re.Match[str]) -> str:
        schema = DOCUMENTED_MODELS[match["name"]].model_json_schema()
        body = json.dumps(schema, indent=2, ensure_ascii=False)
        return f"<!-- schema:{match['name']} -->\n```json\n{body}\n```"

    return SCHEMA_BLOCK.sub(replace, text)


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Raise ``SchemaViolationError`` unless ``instance`` matches ``schema``."""
    _validate(instance, schema, schema, "$")


def _validate(
    instance: Any, schema: dict[str, Any], root: dict[str, Any], path: str
) -> None:
    for keyword, expected in schema.items():
        if keyword in ANNOTATIONS:
            continue
        check = _CHECKS.get(keyword)
        if check is None:
            raise SchemaViolationError(f"{path}: keyword {keyword!r} is not supported")
        check(instance, expected, schema, root, path)


def _fail(path: str, message: str) -> None:
    raise SchemaViolationError(f"{path}: {message}")


def _check_type(
    instance: Any, expected: str, _schema: Any, _root: Any, path: str
) -> None:
    matches = {
        "object": isinstance(instance, dict),
        "array": isinstance(instance, list),
        "string": isinstance(instance, str),
        "integer": isinstance(instance, int) and not isinstance(instance, bool),
        "number": isinstance(instance, int | float) and not isinstance(instance, bool),
        "boolean": isinstance(instance, bool),
        "null": instance is None,
    }
    if expected not in matches:
        _fail(path, f"type {expected!r} is not supported")
    if not matches[expected]:
        _fail(path, f"{instance!r} is not of type {expected}")


def _check_properties(
    instance: Any, properties: dict[str, Any], _schema: Any, root: Any, path: str
) -> None:
    if not isinstance(instance, dict):
        return
    for name, subschema in properties.items():
        if name in instance:
            _validate(instance[name], subschema, root, f"{path}.{name}")


def _check_required(instance: Any, required: list[str], *rest: Any) -> None:
    if isinstance(instance, dict):
        missing = [name for name in required if name not in instance]
        if missing:
            _fail(rest[-1], f"missing required properties {missing}")


def _check_additional(
    instance: Any, allowed: Any, schema: Any, root: Any, path: str
) -> None:
    if allowed is not False or not isinstance(instance, dict):
        if allowed not in (True, False):
            _fail(path, "additionalProperties with a schema is not supported")
        return
    extra = set(instance) - set(schema.get("properties", {}))
    if extra:
        _fail(path, f"unexpected properties {sorted(extra)}")


def _check_any_of(
    instance: Any, options: list[Any], _schema: Any, root: Any, path: str
) -> None:
    errors = []
    for option in options:
        try:
            _validate(instance, option, root, path)
            return
        except SchemaViolationError as error:
            errors.append(str(error))
    _fail(path, f"matches none of anyOf: {errors}")


def _check_ref(instance: Any, ref: str, _schema: Any, root: Any, path: str) -> None:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        _fail(path, f"$ref {ref!r} is not supported")
    _validate(instance, root["$defs"][ref[len(prefix) :]], root, path)


def _check_enum(instance: Any, values: list[Any], *rest: Any) -> None:
    if instance not in values:
        _fail(rest[-1], f"{instance!r} is not one of {values}")


def _check_const(instance: Any, value: Any, *rest: Any) -> None:
    if instance != value:
        _fail(rest[-1], f"{instance!r} is not {value!r}")


def _check_bound(keyword: str) -> Any:
    def check(instance: Any, bound: float, *rest: Any) -> None:
        if isinstance(instance, bool) or not isinstance(instance, int | float):
            return
        ok = {
            "minimum": instance >= bound,
            "maximum": instance <= bound,
            "exclusiveMinimum": instance > bound,
            "exclusiveMaximum": instance < bound,
        }[keyword]
        if not ok:
            _fail(rest[-1], f"{instance!r} violates {keyword} {bound}")

    return check


def _check_length(keyword: str) -> Any:
    def check(instance: Any, bound: int, *rest: Any) -> None:
        if not isinstance(instance, str):
            return
        ok = (
            len(instance) >= bound if keyword == "minLength" else len(instance) <= bound
        )
        if not ok:
            _fail(rest[-1], f"length {len(instance)} violates {keyword} {bound}")

    return check


def _check_pattern(instance: Any, pattern: str, *rest: Any) -> None:
    if isinstance(instance, str) and re.search(pattern, instance) is None:
        _fail(rest[-1], f"{instance!r} does not match {pattern!r}")


def _check_format(instance: Any, name: str, *rest: Any) -> None:
    if name != "date-time":
        _fail(rest[-1], f"format {name!r} is not supported")
    if not isinstance(instance, str):
        return
    try:
        parsed = datetime.fromisoformat(instance)
    except ValueError:
        _fail(rest[-1], f"{instance!r} is not an RFC 3339 date-time")
        return
    if parsed.tzinfo is None:
        _fail(rest[-1], f"{instance!r} has no UTC offset")


def _check_items(instance: Any, items: Any, _schema: Any, root: Any, path: str) -> None:
    if isinstance(instance, list):
        for index, item in enumerate(instance):
            _validate(item, items, root, f"{path}[{index}]")


def _check_count(keyword: str) -> Any:
    def check(instance: Any, bound: int, *rest: Any) -> None:
        if not isinstance(instance, list):
            return
        ok = len(instance) >= bound if keyword == "minItems" else len(instance) <= bound
        if not ok:
            _fail(rest[-1], f"{len(instance)} items violate {keyword} {bound}")

    return check


_CHECKS: dict[str, Any] = {
    "type": _check_type,
    "properties": _check_properties,
    "required": _check_required,
    "additionalProperties": _check_additional,
    "anyOf": _check_any_of,
    "$ref": _check_ref,
    "enum": _check_enum,
    "const": _check_const,
    "minimum": _check_bound("minimum"),
    "maximum": _check_bound("maximum"),
    "exclusiveMinimum": _check_bound("exclusiveMinimum"),
    "exclusiveMaximum": _check_bound("exclusiveMaximum"),
    "minLength": _check_length("minLength"),
    "maxLength": _check_length("maxLength"),
    "pattern": _check_pattern,
    "format": _check_format,
    "items": _check_items,
    "minItems": _check_count("minItems"),
    "maxItems": _check_count("maxItems"),
}
