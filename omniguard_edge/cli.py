"""The one command line, `omniguard-edge`, with typed subcommands.

Each area registers its own commands (runtime/commands.py, export/commands.py, calibration/commands.py,
serve/commands.py); none of those modules imports its extra's heavy packages at import time, so the whole command
line works on a runtime-only install: a command whose extra is missing exits 2 with one line naming the extra to
install, before touching the file system.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .runtime.commandline import EXIT_ERROR, EXIT_USAGE, one_line
from .runtime.errors import OmniGuardError, describe

# the areas whose `commands` module registers subcommands, in the order `--help` lists them
AREAS = ("export", "runtime", "calibration", "serve")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omniguard-edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for area in AREAS:
        importlib.import_module(f".{area}.commands", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 safe/unsafe (and other commands' success), 1 error, 2 usage error, 3 unknown verdict.
    A user error is one line on stderr, never a traceback (`-v` adds the traceback of an unexpected failure)."""
    for stream in (sys.stdout, sys.stderr):  # a surrogate-escaped file name in a message must not crash printing
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "moderate" and not (args.text is not None or args.response is not None
                                           or args.image or args.audio or args.video):
        parser.error("moderate: nothing to moderate: give --text, --response, --image, --audio or --video")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except OmniGuardError as exc:
        print(f"omniguard-edge {args.command}: {one_line(describe(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"omniguard-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure that is not the user's: still one line, the traceback on request
        if args.verbose:
            logging.exception("unexpected failure")
        print(f"omniguard-edge {args.command}: unexpected {one_line(describe(exc))} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
