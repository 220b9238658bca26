"""``mrisegassist`` command line. Each sub-module registers its sub-commands with ``register(subparsers)``.

Every command prints human-readable text with progress bars on long steps, or one JSON document with
``--json``. Errors print one line ``error: <message>`` (no traceback) and exit with a status of
:data:`EXIT_CODES`; input that is accepted but suspicious prints ``warning: <message>``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from ..errors import MRISegAssistError, InputError, InputWarning, Cancelled

#: Exit statuses of every command (``mrisegassist --help`` and README list them).
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure: an output could not be written completely and verified (the previous file is kept), a "
                  "model checkpoint cannot be used, the segmentation server cannot be reached, or an internal error",
    EXIT_BAD_INPUT: "bad input, refused before anything is written: a missing, damaged or implausible file, an "
                    "option or device that does not exist, an output path that is an input, inside a case folder, "
                    "a folder, not writable or of an unsupported format, model code refused (also usage errors)",
    EXIT_CANCELLED: "cancelled (Ctrl-C); nothing partial was written",
}

# Command modules, in the order they appear in --help. A module registers its sub-commands.
COMMAND_MODULES = ("unet", "evaluate", "prompt", "atlas", "batch", "report", "bench", "serve", "server")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON document")


def emit(args: argparse.Namespace, result: Any, text: Optional[Callable[[Any], str]] = None) -> None:
    """Print ``result`` as JSON (``--json``) or through ``text(result)``."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=_json_default))
    elif text is not None:
        print(text(result))


def _json_default(obj: Any) -> Any:
    import numpy as np
    from pathlib import Path

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def build_parser() -> argparse.ArgumentParser:
    import textwrap

    epilog = "exit status:\n" + "\n".join(textwrap.fill(text, 78, initial_indent=f"  {code:<5d}",
                                                         subsequent_indent=" " * 7)
                                           for code, text in EXIT_CODES.items()) + \
        "\nerrors print one line 'error: <message>'; input that is accepted but suspicious\n" \
        "(ignored options, clipped boxes, implausible spacing) prints 'warning: <message>'"
    parser = argparse.ArgumentParser(prog="mrisegassist", description="MRISegAssist: brain-MRI segmentation (U-Net, "
                                     "box prompts, registration atlas). Not for clinical use.", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"mrisegassist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register_modules(sub, __name__, COMMAND_MODULES)
    return parser


def register_modules(sub, package: str, names: Sequence[str]) -> None:
    """Import ``package.<name>`` for each name and call its ``register(sub)``; absent modules are skipped."""
    for name in names:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{package}.{name}":
                continue  # not installed in this build
            raise
        module.register(sub)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """:class:`InputWarning` as one short line ``warning: <message>``; other warnings as Python prints them."""
    if issubclass(category, InputWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit status (:data:`EXIT_CODES`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default", InputWarning)
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except MRISegAssistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - a bug: one line for the user, the traceback on request
        if os.environ.get("MRISEGASSIST_TRACEBACK"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error ({type(exc).__name__}{': ' + first if first else ''}); this is a bug, "
              f"please report it (set MRISEGASSIST_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
