"""The ``raymanifold`` command.

Sub-commands live in :mod:`raymanifold.commands`; every module there defines
``register(subparsers, study_subparsers)`` and is discovered automatically,
so a family adds its commands (``raymanifold study <name>``) without editing
this file. Expected errors (bad config, unknown data set, missing model)
print one line ``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

EXPECTED_ERRORS: tuple = ()


def _expected_errors() -> tuple:
    from raymanifold.checkpoint import CheckpointError
    from raymanifold.config import ConfigError
    from raymanifold.data import DataError
    from raymanifold.commands import UsageError

    return (ConfigError, DataError, CheckpointError, UsageError)


def build_parser() -> argparse.ArgumentParser:
    import raymanifold.commands as pkg

    parser = argparse.ArgumentParser(
        prog="raymanifold",
        description="Probabilistic and semantic models of image manifolds on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    study = sub.add_parser("study", help="reproduce a study of the papers; writes reports/<name>/")
    study_sub = study.add_subparsers(dest="study", metavar="STUDY")
    study.set_defaults(func=lambda args: study.print_help() or 2)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        mod.register(sub, study_sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "tracking_uri", None):
        # one store for the whole command: runs:/ URIs given to --model & co. resolve against --tracking-uri,
        # and Ray workers inherit it (as raymanifold.commands.apply_common does)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        rc = args.func(args)
    except _expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
