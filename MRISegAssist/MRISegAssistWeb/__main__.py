"""``python -m MRISegAssistWeb [options]`` = ``mrisegassist serve [options]`` without loading the other commands."""
from __future__ import annotations

import argparse
import sys

from mrisegassist.cli.serve import register
from mrisegassist.errors import InputError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MRISegAssistWeb")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
