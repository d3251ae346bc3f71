"""Command-line options shared by the commands that load a model (``select``, ``eval``, ``classify``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

Model = Annotated[str | None, typer.Option(help="HF folder or hub id (default: the embedded model).")]
Sae = Annotated[list[str] | None, typer.Option(help="SAE folder or 'release[:sae_id]' (repeat; default: the bundled SAEs).")]
Quantization = Annotated[str | None, typer.Option(help="4bit or 8bit (bitsandbytes).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or auto.")]
Threads = Annotated[int, typer.Option(help="Torch CPU threads.")]


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Inside a command: a ``SafeguardError`` is printed as ``error: ...`` on stderr and the command exits 1 (no traceback)."""
    from .errors import SafeguardError

    try:
        yield
    except SafeguardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
