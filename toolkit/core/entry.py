"""The front door the three CLIs share: exit codes, ``--version``, help format, progress bars.

It lives in the run-time core, not in ``toolkit.cli``, so that ``edge-runtime`` on a
board and ``cloud-trainer`` on a server get the same behaviour without importing
the build side.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable, Sequence
from typing import Any

from toolkit import __version__
from toolkit.core.errors import HiertrainError


class ExitCode(enum.IntEnum):
    """Distinct exit codes, documented in docs/cli.md; supervisors branch on them."""

    OK = 0
    BUG = 1  # an unexpected exception: Python's own exit code, with its traceback
    USAGE = 2  # argparse: unknown flag, missing or malformed argument
    BAD_INPUT = 3  # bad input or configuration (HiertrainError)
    BROKER_UNREACHABLE = 4  # the broker did not answer (BrokerUnreachableError)
    INCOMPLETE = 5  # the run stopped before its work was done (RunIncompleteError)
    INTERRUPTED = 130  # Ctrl-C


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default next to its help and keeps descriptions as written.

    A ``None`` default is left out: it means "unset", and the help text says what
    unset does, which "(default: None)" would only contradict.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands inherit the shared help format.

    ``add_subparsers`` builds sub-parsers of ``type(self)``, so setting the format
    here reaches every sub-command without each ``add_parser`` call naming it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def new_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A top-level parser with ``--version`` and the shared help format."""
    parser = Parser(prog=prog, description=description, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def show_progress(stream: Any = None) -> bool:
    """Progress bars only on a terminal: logs and CI output stay free of carriage returns."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser]) -> int:
    """Parse, dispatch, and turn user errors into one line on stderr and a distinct exit code."""
    args = parser_factory().parse_args(argv)
    try:
        return int(args.func(args))
    except HiertrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", ExitCode.BAD_INPUT))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
