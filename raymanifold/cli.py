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
        description="Probabilistic and semantic models of image manifolds on Ray, tracked in MLflow. "
                    "Start with docs/getting-started.md; `raymanifold list` shows configs, data sets, families, "
                    "experiments and studies. Outputs go under RAYMANIFOLD_HOME (default: the current directory).")
    parser.add_argument("--version", action="version", version=f"raymanifold {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    study = sub.add_parser("study", help="reproduce a study of the papers; writes reports/<name>/")
    study_sub = study.add_subparsers(dest="study", metavar="STUDY")
    study.set_defaults(func=lambda args: study.print_help() or 2)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "register"):  # helpers (options, study) register nothing
            mod.register(sub, study_sub)
    for sp in _subparsers(parser):
        sp.formatter_class = DefaultsFormatter  # every --help shows the defaults
    return parser


def _shows_default(action) -> bool:
    return (bool(action.option_strings) and action.default not in (None, False, [], "", argparse.SUPPRESS)
            and action.help != argparse.SUPPRESS)


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, unless its help already names it ("default ...")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not _shows_default(action) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action):
        if action.help is None and _shows_default(action):
            action.help = ""  # an option without help still shows its default
            try:
                return super()._format_action(_with_help(action, self._get_help_string(action)))
            finally:
                action.help = None
        return super()._format_action(action)


def _with_help(action, text):
    import copy

    a = copy.copy(action)
    a.help = text
    return a


def _subparsers(parser):
    """Every sub-parser of ``parser`` (commands and ``study`` sub-commands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                yield sp
                yield from _subparsers(sp)


#: commands that write nothing under the output root (no start-up line naming it; serve's first line is its own)
NO_ROOT_LINE = ("list", "compare", "serve")
#: option names (argparse dests) that name input files or folders; see :func:`_absolute_inputs`
INPUT_DESTS = ("config", "glow_config", "config_dir", "model", "ddpm", "data", "ood", "classifier", "reference",
               "guided_reference")


def _absolute_inputs(args) -> None:
    """Before the CLI changes into ``RAYMANIFOLD_HOME``: input paths given relative to the caller's directory that
    exist there (``--config``, ``--model``, ``--model-<role>``, ``--ddpm``, ``--data`` ...) are made absolute, so
    they keep meaning the caller's files. Outputs (``--out``) stay relative and land in the home."""
    from raymanifold.paths import absolute, is_uri

    def fix(value: str) -> str:
        if not is_uri(value) and not os.path.isabs(value) and os.path.exists(value):
            return absolute(value)
        role, sep, rest = value.partition("=")  # --model ROLE=PATH
        if sep and rest and not is_uri(rest) and not os.path.isabs(rest) and os.path.exists(rest):
            return f"{role}={absolute(rest)}"
        return value

    for dest, value in vars(args).items():
        if not (dest in INPUT_DESTS or dest.startswith(("model_", "deprecated_"))) or not value:
            continue
        if isinstance(value, str):
            setattr(args, dest, fix(value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            setattr(args, dest, [fix(v) for v in value])


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("raymanifold")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def main(argv=None) -> int:
    from raymanifold import paths

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "tracking_uri", None):
        # one store for the whole command: runs:/ URIs given to --model & co. resolve against --tracking-uri,
        # and Ray workers inherit it (as raymanifold.commands.options.parse_options does)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    start, saved_caller, saved_home = os.getcwd(), os.environ.get(paths.CALLER_ENV), os.environ.get(paths.HOME_ENV)
    try:
        # one output root (raymanifold.paths): inputs keep meaning the caller's files, outputs land in the home
        os.environ[paths.CALLER_ENV] = start
        home = paths.home()
        if saved_home:
            os.environ[paths.HOME_ENV] = str(home)  # absolute: a relative RAYMANIFOLD_HOME means the caller's
        if args.command not in NO_ROOT_LINE:
            print(f"output root: {home} ({paths.home_source()})", file=sys.stderr, flush=True)
        if str(home) != start:
            _absolute_inputs(args)
            os.chdir(home)
        from raymanifold.commands.study import DryRun

        try:
            rc = args.func(args)
        except DryRun:  # --dry-run: the plan is printed
            rc = 0
    except _expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        os.chdir(start)  # in-process callers (tests) get their directory and environment back
        for key, saved in ((paths.CALLER_ENV, saved_caller), (paths.HOME_ENV, saved_home)):
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
