"""The ``aligncollapse`` command line. Each command writes a versioned ``results.json`` under ``--out``
and renders its report from it.

User errors print one line (``error: ...``) and exit with status 2; Ctrl-C exits with 130
after the running command has saved what it computed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from aligncollapse import __version__, distributed
from aligncollapse.cli import demo, evaluate, finetune, fisher, organism, rank, report, scan, study, theory, validate
from aligncollapse.cli.args import Parser
from aligncollapse.cli.common import lock_out, out_dir, prepare_out, quiet_libraries
from aligncollapse.errors import NonFiniteError, RunDiverged, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="aligncollapse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"aligncollapse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also ALIGNCOLLAPSE_DEBUG=1)")
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


def _remove_if_empty(path: Path | None) -> None:
    """Remove an output directory this run created when it holds nothing but the lock file."""
    if path is None or not path.is_dir():
        return
    own = {".aligncollapse.lock", ".aligncollapse-run"}
    if {p.name for p in path.iterdir()} <= own:
        for name in own:
            (path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


# Commands that manage their --out themselves (organism build publishes a whole directory).
UNLOCKED = {"report", "organism build"}
# Commands that split their work over torchrun's processes (rank 0 writes and prints).
DISTRIBUTED = {"scan", "finetune", "fisher", "rank", "validate", "study"}


def _start_distributed(args, name: str) -> None:
    """Under torchrun: join the process group, give each rank its own GPU, silence all but rank 0."""
    if not distributed.launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if name not in DISTRIBUTED:
        raise UserError(f"{name} does not run under torchrun; these do: {', '.join(sorted(DISTRIBUTED))}")
    distributed.init_from_env(getattr(args, "device", None))
    if hasattr(args, "device"):
        args.device = distributed.local_device(args.device)
    if not distributed.is_main():
        os.environ["ALIGNCOLLAPSE_QUIET"] = "1"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 user error, 3 diverged / non-finite, 130 interrupted,
    1 an unexpected internal error (one line; ``--debug`` or ALIGNCOLLAPSE_DEBUG=1 shows the traceback)."""
    quiet_libraries()
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("ALIGNCOLLAPSE_DEBUG") == "1"
    name = args.command + (f" {args.organism_command}" if args.command == "organism" else "")
    created: Path | None = None
    try:
        _start_distributed(args, name)
        with contextlib.ExitStack() as stack:
            stack.callback(distributed.shutdown)
            if hasattr(args, "out") and name not in UNLOCKED and distributed.is_main():
                out = out_dir(args, args.command)
                created = None if out.exists() else out
                out = prepare_out(out, flag="--out", command=name)
                args.out = str(out)
                stack.enter_context(lock_out(out))
                stack.callback(_remove_if_empty, created)
            elif name == "organism build":
                prepare_out(Path(args.out), flag="--out", create=False)
            if hasattr(args, "out") and distributed.is_distributed():
                args.out = distributed.broadcast_object(args.out)  # rank 0's resolved --out, for every rank
            rc = args.func(args)
            if rc == 0:
                distributed.finish_together()  # bounded: see its docstring
            return rc
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RunDiverged, NonFiniteError) as e:
        print(f"diverged: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: what was computed is saved under --out (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, traceback on request
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
