"""Stage 11 — the ``aligncollapse`` command line: one module per command."""

from aligncollapse.cli.main import main

__all__ = ["main"]
