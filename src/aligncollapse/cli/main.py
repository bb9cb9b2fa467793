"""The ``aligncollapse`` command line. Each command writes a versioned ``results.json`` under ``--out``
and renders its report from it.

User errors print one line (``error: ...``) and exit with status 2; Ctrl-C exits with 130
after the running command has saved what it computed.
"""

from __future__ import annotations

import argparse
import sys

from aligncollapse import __version__
from aligncollapse.cli import demo, evaluate, finetune, fisher, organism, rank, report, scan, study, theory, validate
from aligncollapse.cli.args import Parser
from aligncollapse.cli.common import quiet_libraries
from aligncollapse.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="aligncollapse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"aligncollapse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    organism.register(sub)
    evaluate.register(sub)
    finetune.register(sub)
    fisher.register(sub)
    scan_parser = scan.register(sub)
    validate.register(sub, scan_parser)
    rank.register(sub)
    study.register(sub)
    theory.register(sub)
    demo.register(sub)
    report.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was computed is saved under --out (rerun the same command to resume)", file=sys.stderr)
        return 130
