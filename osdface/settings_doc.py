"""The configuration reference page, generated from `Settings` (one source for every setting)
and the `osdface serve` flags that set them.

`python -m osdface.settings_doc > docs/configuration.md` rewrites the page;
`tests/test_settings_doc.py` fails when the page and the class disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from osdface import serve
from service.settings import Settings

COMMAND = "python -m osdface.settings_doc > docs/configuration.md"
BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))

INTRO = f"""\
# Configuration

<!-- Generated from service/settings.py and model/runtime/settings.py by
`{COMMAND}`; edit the classes, not this page. -->

Every setting of the service is a field of `service.settings.Settings`, read from the
environment with the prefix `{{prefix}}`. The settings of the model, the detector, the limits,
the fast path and the background tiles are those of `model.runtime.settings.RuntimeSettings`,
which `Settings` extends and `osdface restore` reads too ([cli.md](cli.md)). `osdface serve`
flags, where a setting has one, override the environment. A value the class refuses stops the
server at start-up with the setting named.
Lists are written as JSON, e.g. `{{prefix}}CORS_ORIGINS='["https://app.example.com"]'`; an unset
optional setting is left out of the environment.

The Docker image, compose and Kubernetes files set the same variables
(`tests/test_docker_files.py` refuses a name that is not a setting or a value the class
refuses). How the batching, queue and shutdown settings interact is in
[operations.md](operations.md); the fast-path switches are explained in
[performance.md](performance.md).

| variable | `osdface serve` flag | values | default | meaning |
|---|---|---|---|---|
"""


def serve_flags() -> dict[str, str]:
    """{environment name: flag} for the `osdface serve` flags whose help names a setting."""
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {}
    for action in sub.choices["serve"]._actions:
        for word in (action.help or "").replace("(", " ").replace(")", " ").split():
            name = word.rstrip(",")
            if name.startswith(env_prefix()) and action.option_strings:
                flags[name] = action.option_strings[-1]
    return flags


def env_prefix() -> str:
    return Settings.model_config.get("env_prefix", "")


def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, FieldInfo]]:
    """(environment name, field) for each field, nested models expanded when the env allows it."""
    delimiter = Settings.model_config.get("env_nested_delimiter")
    found = []
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        nested = field.annotation
        if delimiter and isinstance(nested, type) and issubclass(nested, BaseModel):
            found += rows(nested, env + delimiter)
        else:
            found.append((env, field))
    return found


def describe_type(annotation: Any, metadata: list[Any]) -> str:
    """Allowed values in words: `a` \\| `b` for literals, bounds for numbers."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(describe_type(a, metadata) for a in inner)
        return f"{text}, or unset" if len(inner) < len(args) else text
    if origin is tuple:
        return f"JSON list of {describe_type(args[0], [])}"
    if origin is Annotated:  # e.g. PositiveInt inside `X | None`
        return describe_type(args[0], [*args[1:], *metadata])
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    words = {bool: "`true` \\| `false`", int: "integer", float: "number", str: "text", Path: "path"}
    words[SecretStr] = "text (kept out of logs)"
    text = words.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = []
    for item in metadata:
        for kind, attr, symbol in BOUNDS:
            if isinstance(item, kind):
                bounds.append(f"{symbol} {getattr(item, attr)}")
    return f"{text} {', '.join(bounds)}" if bounds else text


def describe_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list):
        return f"`{json.dumps(list(value), separators=(',', ':'))}`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, BaseModel):
        return f"`{value.model_dump_json()}`"
    return f"`{value}`"


def render() -> str:
    """The whole page, as `docs/configuration.md` holds it."""
    flags = serve_flags()
    lines = [INTRO.format(prefix=env_prefix())]
    for env, field in rows(Settings, env_prefix()):
        values = describe_type(field.annotation, list(field.metadata))
        default = describe_default(field.get_default(call_default_factory=True))
        flag = f"`{flags[env]}`" if env in flags else ""
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{env}` | {flag} | {values} | {default} | {meaning} |\n")
    return "".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
