"""Command-line options shared by the commands that load a model (``select``, ``eval``, ``classify``)."""

from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[str | None, typer.Option(help="HF folder or hub id (default: the embedded model).")]
Sae = Annotated[list[str] | None, typer.Option(help="SAE folder or 'release[:sae_id]' (repeat; default: the bundled SAEs).")]
Quantization = Annotated[str | None, typer.Option(help="4bit or 8bit (bitsandbytes).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or auto.")]
Threads = Annotated[int, typer.Option(help="Torch CPU threads.")]
