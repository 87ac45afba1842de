"""Rollout policy errors in words that name what to change.

pydantic and PyYAML describe errors in their own terms ("Extra inputs are not
permitted", ``in "<unicode string>"``). This module turns each error into a
``PolicyProblem``: the field as written in the policy, the value found there,
and a message with the expected value and what the field means.

It imports neither PyYAML nor any I/O, because ``workflows.policy`` imports
it and the release workflow's sandbox loads that module.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from otaflow.errors import PolicyProblem

# A policy with more problems than this is probably not a policy at all, and a
# longer list would bury the first problems.
MAX_REPORTED_PROBLEMS = 10

FIELD_MEANINGS = {
    "percent": "the cumulative share of the fleet in percent, such as 25",
    "min_devices": "a cumulative number of devices",
    "bake_s": "seconds to watch a finished wave before judging it",
    "success_threshold": "a fraction of finished devices, such as 0.95",
    "max_failures": "a number of failed devices per wave, or null for no cap",
    "min_finished": "a number of finished devices",
    "device_deadline_s": "seconds a device has to finish its install",
    "dispatch_rate_per_s": (
        "install commands per second, or null for OTAFLOW_DISPATCH_RATE_PER_S"
    ),
    "name": "a name of 1 to 64 characters",
    "seed": "the salt of the stable device order, up to 200 characters",
}
TYPE_EXPECTATIONS = {
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text (put quotes around it)",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping of field names to values",
    "model_type": "a mapping of field names to values",
    "model_attributes_type": "a mapping of field names to values",
}
# pydantic error type: (the context key of the limit, how the value misses it)
RANGE_ERRORS = {
    "greater_than": ("gt", "is not above"),
    "greater_than_equal": ("ge", "is below"),
    "less_than": ("lt", "is not below"),
    "less_than_equal": ("le", "is above"),
}
NO_STAGES_MESSAGE = (
    "at least one stage is required, such as 'stages: [{name: all, percent: 100}]'"
)


def describe_validation_errors(
    error: ValidationError, model: type[BaseModel]
) -> list[PolicyProblem]:
    """Describe every error of ``model``'s validation, one problem each."""
    return [_describe(details, model) for details in error.errors()]


def describe_yaml_error(error: Exception) -> str:
    """Describe a PyYAML error by line and column, without its ``<unicode string>``.

    The attributes read here are those of ``yaml.MarkedYAMLError`` and
    ``yaml.reader.ReaderError`` (PyYAML 6).
    """
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        context = getattr(error, "context", None)
        detail = f"{context}, {problem}" if context else problem
        return (
            f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}:"
            f" {detail}; fix the syntax there"
        )
    reason = getattr(error, "reason", None)
    position = getattr(error, "position", None)
    if reason and position is not None:
        return (
            f"invalid YAML at character {position + 1}: {reason}; remove that character"
        )
    return f"invalid YAML: {error}"


def format_location(location: tuple[int | str, ...]) -> str:
    """``("stages", 0, "bake_s")`` to ``stages[0].bake_s``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def show_value(value: object) -> str:
    """Format a value as a policy's author wrote it: ``95``, ``'fast'``, ``null``."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        # 100.0 reads as 100, as the author most likely wrote it.
        return f"{value:g}"
    if isinstance(value, int | str):
        return repr(value)
    return json.dumps(value, default=str)


def _describe(details: ErrorDetails, model: type[BaseModel]) -> PolicyProblem:
    location = tuple(details["loc"])
    field = format_location(location) or "policy"
    kind = details["type"]
    value = details.get("input")
    name = location[-1] if location and isinstance(location[-1], str) else ""

    if location == ("stages",) and (kind in ("missing", "too_short") or value is None):
        return PolicyProblem(field, value, NO_STAGES_MESSAGE)
    if kind == "extra_forbidden":
        parent = _model_at(model, location[:-1])
        return PolicyProblem(field, value, _unknown_field_message(name, parent))
    if kind == "missing":
        return PolicyProblem(field, None, _missing_message(location))
    if kind == "value_error":
        return _value_error(details, field)
    return PolicyProblem(field, value, _value_message(details, name))


def _value_message(details: ErrorDetails, name: str) -> str:
    kind = details["type"]
    value = details.get("input")
    context = details.get("ctx", {})
    meaning = FIELD_MEANINGS.get(name)
    suffix = f"; it is {meaning}" if meaning else ""
    if kind in RANGE_ERRORS:
        key, relation = RANGE_ERRORS[kind]
        limit = show_value(context[key])
        return f"{show_value(value)} {relation} {limit}{suffix}"
    if kind in TYPE_EXPECTATIONS:
        return f"{show_value(value)} is not {TYPE_EXPECTATIONS[kind]}{suffix}"
    if kind == "enum":
        return f"{show_value(value)} is not valid; expected {context['expected']}"
    if kind == "string_too_short":
        return f"{show_value(value)} is empty{suffix}"
    if kind == "string_too_long":
        return (
            f"{len(str(value))} characters is more than the maximum of"
            f" {context['max_length']}{suffix}"
        )
    message = details["msg"]
    return f"{message[:1].lower()}{message[1:]} (got {show_value(value)}){suffix}"


def _unknown_field_message(name: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return "unknown field"
    known = list(model.model_fields)
    message = f"unknown field; known fields: {', '.join(known)}"
    suggestion = _closest_field(name, known)
    return f"{message}; did you mean {suggestion}?" if suggestion else message


def _closest_field(name: str, known: list[str]) -> str | None:
    """Return the known field that ``name`` abbreviates, extends or nearly spells."""
    if not name:
        return None
    for field in known:
        if field.startswith(name) or name.startswith(field):
            return field
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


def _missing_message(location: tuple[int | str, ...]) -> str:
    if len(location) == 3 and location[0] == "stages":
        return "missing; every stage needs a name and a percent"
    return "missing; add it"


def _value_error(details: ErrorDetails, field: str) -> PolicyProblem:
    """Describe a model validator's error, whose message may start with its field."""
    message = details["msg"].removeprefix("Value error, ")
    named_field, separator, rest = message.partition(": ")
    if separator and named_field.startswith("stages["):
        return PolicyProblem(named_field, None, rest)
    # The input of a model validator's error is the whole model, which is no
    # help to show back.
    return PolicyProblem(field, None, message)


def _model_at(
    model: type[BaseModel], location: tuple[int | str, ...]
) -> type[BaseModel] | None:
    """Return the model that validates the mapping at ``location`` in ``model``."""
    current: type[BaseModel] | None = model
    for part in location:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            return None
        current = _nested_model(current.model_fields[part].annotation)
    return current


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """Return the model in an annotation such as ``list[StageInput]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, tuple, types.UnionType, typing.Union):
        for argument in typing.get_args(annotation):
            found = _nested_model(argument)
            if found is not None:
                return found
    return None
