"""Entry point of the ``local`` backend plugin."""

from __future__ import annotations

from dschat_core.hookspecs import hookimpl

from .backend import LocalBackend


@hookimpl
def register_backends(register) -> None:
    register(LocalBackend())
