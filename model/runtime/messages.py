"""Validation errors in the project's own words: the one table from pydantic's error types to
plain phrases, used for settings, command-line flags and HTTP form fields alike.

pydantic says "Input should be less than or equal to 4" and "Extra inputs are not permitted";
a user reads "must be at most 4" and "is not a known field; did you mean strength?".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

# pydantic error type -> phrase; `{name}` fields come from the error's context.
PHRASES: Mapping[str, str] = {
    "less_than_equal": "must be at most {le}",
    "less_than": "must be under {lt}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be over {gt}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "string_too_long": "must be at most {max_length} characters",
    "string_too_short": "must be at least {min_length} characters",
    "too_long": "must have at most {max_length} items",
    "too_short": "must have at least {min_length} items",
}


def phrase(error: Mapping[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as a short phrase."""
    kind = str(error.get("type", ""))
    context = dict(error.get("ctx") or {})
    if kind == "value_error" and "error" in context:
        return str(context["error"])  # our validators' own words, without "Value error, "
    template = PHRASES.get(kind)
    if template is None:
        return str(error.get("msg", "is not valid"))
    try:
        return template.format(**{k: _plain(v) for k, v in context.items()})
    except (KeyError, IndexError):
        return str(error.get("msg", "is not valid"))


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """'; did you mean strength?' when a known name is close to `name`, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def describe(
    exc: ValidationError,
    *,
    label: Callable[[str], str] = str,
    known: Iterable[str] = (),
    show_input: bool = False,
    secret: Iterable[str] = (),
) -> list[str]:
    """One line per error: `<label(field)> <phrase>`, with a did-you-mean for an unknown field
    among `known`, and the value given when `show_input` (never for the `secret` fields)."""
    hidden = set(secret)
    names = list(known)
    lines = []
    for error in exc.errors():
        loc = error.get("loc") or ()
        field = str(loc[-1]) if loc else ""
        text = phrase(error)
        if error.get("type") == "extra_forbidden" and names:
            text += did_you_mean(field, names)
        elif (
            show_input
            and field
            and field not in hidden
            and "input" in error
            and (error.get("type") != "missing")
        ):
            text += f" (got {error['input']!r})"
        lines.append(f"{label(field)} {text}" if field else text)
    return lines
