"""CLI subcommands of the inference side: infer, evaluate, predict."""

from __future__ import annotations


def register_infer_commands(sub) -> None:
    pass
