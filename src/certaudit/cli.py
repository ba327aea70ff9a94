"""The ``certaudit`` command line.

Each verb lives in its own module under :mod:`certaudit.commands` and registers itself on
:data:`app` through a ``register(app)`` function. :func:`main` runs the app and maps errors to exit
codes: 0 success, 2 bad input (one line on stderr), 1 bug (traceback).
"""

from __future__ import annotations

import importlib
import sys

import typer
from typer.exceptions import Abort, Exit, TyperException

from certaudit.errors import InputError

app = typer.Typer(
    name="certaudit",
    help="What is a robustness certificate really worth? Certify, degrade, spoof, check detector claims.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Verb modules, in the order they appear in --help. Every one must import: a missing or broken
# verb is a packaging bug and fails loudly, never a silently shorter --help.
COMMAND_MODULES = [
    "certaudit.commands.train",
    "certaudit.commands.evaluate",
    "certaudit.commands.certify",
    "certaudit.commands.import_model",
    "certaudit.commands.check_detector",
    "certaudit.commands.spoof",
    "certaudit.commands.degrade",
    "certaudit.commands.audit",
    "certaudit.commands.demo",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()


def _is_out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError"


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "invalid input"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, return the exit code (0 ok, 2 bad input, 1 bug)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = app(args=args, prog_name="certaudit", standalone_mode=False)
    except Exit as exc:
        code = int(exc.exit_code or 0)
        if code == 130:  # typer's form of Ctrl-C
            print("certaudit: interrupted; rows written so far are kept: rerun the same command to resume",
                  file=sys.stderr)
        return code
    except Abort:  # typer's form of Ctrl-C
        print("certaudit: interrupted; rows written so far are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            return 2
        print(f"certaudit: error: {_one_line(exc.format_message())}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"certaudit: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave cannot be read or written: disk full, read-only, missing folder
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"certaudit: error: {_one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except MemoryError:
        print("certaudit: error: not enough memory for this run; lower --batch-size, --samples or --chunk",
              file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        print("certaudit: error: not enough memory for this run (the allocator refused); lower --batch-size, "
              "--samples or --chunk", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("certaudit: interrupted; rows written so far are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    code = int(result) if isinstance(result, int) else 0
    if code == 130:  # typer returns Ctrl-C as 130 when not in standalone mode
        print("certaudit: interrupted; rows written so far are kept: rerun the same command to resume",
              file=sys.stderr)
    return code


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
