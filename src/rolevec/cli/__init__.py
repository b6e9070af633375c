"""The `rolevec` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module with a ``register(subparsers)`` function; errors the user can fix
(RolevecError) and file system refusals (OSError) become one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from ..errors import RolevecError

#: Subcommand modules, in the order they appear in --help.
COMMANDS = (
    "info",
    "extract",
    "diagnose",
    "prompts",
    "generate",
    "fold",
    "export",
    "sweep",
    "evaluate",
    "run",
    "report",
    "rank",
    "monitor",
)


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="rolevec",
        description="Role vectors: steer a language model toward a domain expertise by editing activations.",
    )
    parser.add_argument("--version", action="version", version=f"rolevec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


#: Commands whose records resume: an interrupted run continues where it stopped.
RESUMING = ("sweep", "evaluate", "run")


def interrupted_note(args: argparse.Namespace) -> str:
    """What an interrupt leaves, true for the command that was interrupted."""
    if args.command not in RESUMING:
        return "nothing was written under the output's final name; rerun the command to start over"
    note = "finished work is kept and a rerun on the same --out continues from it"
    if getattr(args, "force", False):
        note += (
            "; the earlier results that --force set aside are kept in --out's .rolevec-trash: a rerun "
            "without --force puts them back, a rerun with --force finishes replacing them"
        )
    return note


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    """The subcommand's own parser, whose flags a library message is spelled in."""
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(command)
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .common import plain_warnings, to_flags

    command = _command_parser(parser, args.command)
    try:
        with plain_warnings(command):
            result = args.func(args)
    except RolevecError as exc:
        print(f"rolevec: error: {to_flags(str(exc), command)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal the checks up front could not foresee
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"rolevec: error: cannot use{where} ({exc.strerror or exc}): check the path and its permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"rolevec: interrupted; {interrupted_note(args)}", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
