"""The configuration reference (docs/configuration.md), generated from the schema so it cannot drift."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel

from .config import RunConfig

HEADER = """# Configuration reference

Generated from the schema by `dschat-core config reference`; a test keeps this file current.
One YAML file configures every stage; `--set section.key=value` overrides any key. Unknown keys, wrong types
and out-of-range values exit with code 2 and a one-line message naming the key. Stage sections use
DeepSpeed-Chat's flag names and defaults; its hard-coded PPO constants are settings here with the same values.
Each backend validates its own section under `backends:` (see docs/backends/).
"""


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a constrained type reads as its base type
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        value = field.default
    return f"`{json.dumps(value)}`"


def _bounds(field) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{sign} {bound}")
    return ", ".join(parts)


def section_table(model: type[BaseModel], title: str) -> list[str]:
    lines = [f"## `{title}`", ""]
    if model.__doc__ and model is not RunConfig:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((annotation, name))
            lines.append(f"| `{name}` | section | | | see [`{name}`](#{name}) |")
            continue
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(annotation)} | {_default(field)} | {_bounds(field)} | {meaning} |")
    lines.append("")
    for sub, name in nested:
        lines += section_table(sub, name)
    return lines


def config_reference() -> str:
    return HEADER + "\n" + "\n".join(section_table(RunConfig, "top level"))
