"""The ``fgvce`` command line.

Each subcommand lives in ``fgvce_jax/commands/<name>.py`` and provides
``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int | None``.
Errors a user can fix are raised as :class:`fgvce_jax.errors.FgvceError` and
printed here as one line (exit status 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import os
import sys

from fgvce_jax.errors import FgvceError

COMMANDS = ("demo", "convert", "train", "train-decoder", "train-surrogate", "explain", "report", "evaluate")
# file-system conditions a user fixes (a path, permissions, space): one line, not a traceback
USER_ERRNOS = {errno.EEXIST: None, errno.ENOTDIR: None, errno.EISDIR: None, errno.EACCES: None, errno.EPERM: None,
               errno.EROFS: None, errno.ENOENT: None,
               errno.ENOSPC: "free some space and re-run the same command: finished work is kept",
               errno.EDQUOT: "free some space and re-run the same command: finished work is kept"}


def _available_commands() -> dict:
    mods = {}
    for name in COMMANDS:
        module = f"fgvce_jax.commands.{name.replace('-', '_')}"  # `train-decoder` lives in train_decoder.py
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as e:  # command not built yet in this checkout
            if e.name != module:
                raise
    return mods


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fgvce",
        description="Fine-grained counterfactual explanations of a classifier's mistakes (FG-VCE) in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"fgvce {importlib.metadata.version('fgvce-jax')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in _available_commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=DefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FgvceError as e:
        return _fail(args.command, str(e))
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        hint = USER_ERRNOS[e.errno]
        return _fail(args.command, f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
                     + (f"; {hint}" if hint else ""))
    except KeyboardInterrupt:
        print(f"fgvce {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    """Print ``message`` as the command's one-line error; exit status 2."""
    print(f"fgvce {command}: error: {message}", file=sys.stderr)
    if _distributed():  # leave now: waiting at jax.distributed's shutdown barrier would hang this process
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)
    return 2


def _distributed() -> bool:
    """Whether this process is one of a ``jax.distributed`` run (the others stop when its heartbeat does)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
