"""The core's own plugin: registered on every plugin manager, through the same hooks adapters use."""

from __future__ import annotations

from .data.formats import BUILTIN_FORMATS
from .hookspecs import hookimpl


@hookimpl
def register_dataset_formats(register) -> None:
    for fmt in BUILTIN_FORMATS:
        register(fmt)
