"""``mrisegassist`` command line. Each sub-module registers its sub-commands with ``register(subparsers)``.

Every command prints human-readable text with progress bars on long steps, or one JSON document with
``--json``. Errors print ``error: <message>`` and exit with status 2 (bad input) or 1 (other failure).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Optional, Sequence

from ..errors import MRISegAssistError, InputError, Cancelled

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
    parser = argparse.ArgumentParser(prog="mrisegassist", description="MRISegAssist: brain-MRI segmentation (U-Net, box prompts, registration atlas). Not for clinical use.")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except MRISegAssistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
