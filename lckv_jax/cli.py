"""How every command-line entry point reports errors and exits.

A user error (a bad flag value, a missing or damaged file, shapes that do not fit) is one line on
stderr and exit code 2; `--debug` on the command line or `LCKV_DEBUG=1` in the environment shows
the traceback instead. Anything else is an internal bug and keeps its traceback.

Exit codes, for schedulers and scripts (README, "Exit codes"):
  0 done; 1 internal error (traceback); 2 user error; 3 training diverged (non-finite loss or
  gradient norm); 75 preempted by SIGTERM after saving a checkpoint (EX_TEMPFAIL: requeue and run
  the same command to resume); 130 interrupted by Ctrl-C after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class UserError(ValueError):
  """An error the user can fix by changing a flag, a config field or a file: one line, exit 2."""


class Diverged(RuntimeError):
  """Training met a non-finite loss or gradient norm: exit 3 (the newest checkpoint is finite)."""


# What a user's mistake surfaces as: our own validation raises ValueError (or UserError) naming
# the field; a path that is missing, unreadable, a file where a folder belongs, or taken.
USER_ERRORS = (ValueError, OSError, ImportError, UnicodeDecodeError)
# Errors that are ours even when they subclass the above.
_INTERNAL = (NotImplementedError, RecursionError)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes (a missing or malformed flag) are user errors: one line, exit 2,
  instead of a usage block; `--help` still prints the usage."""

  def error(self, message):
    raise UserError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get("LCKV_DEBUG", "") not in ("", "0")


def strip_debug_flag(argv: list[str]) -> list[str]:
  """argv without `--debug` (entry points accept it whatever their own parser is)."""
  return [a for a in argv if a != "--debug"]


def one_line(e: BaseException) -> str:
  """The error's message on one line (multi-line messages joined with '; ')."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = "; ".join(lines) if lines else type(e).__name__
  if isinstance(e, OSError) and e.filename and e.strerror and not lines[1:]:
    text = f"{e.filename}: {e.strerror}"
  return text


def report(e: BaseException, prog: str | None = None) -> int:
  """Prints a user error as one line on stderr; returns its exit code."""
  if isinstance(e, Diverged):
    code = EXIT_DIVERGED
  else:
    code = EXIT_USER_ERROR
  name = prog or os.path.basename(sys.argv[0] or "lckv_jax")
  print(f"{name}: error: {one_line(e)}", file=sys.stderr)
  return code


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, USER_ERRORS + (Diverged,)) and not isinstance(e, _INTERNAL)


def run(main: Callable[..., int | None], argv: list[str] | None = None,
        prog: str | None = None) -> None:
  """Calls `main(argv)` and exits with its code; user errors become one line and exit 2.

  `argv` defaults to `sys.argv[1:]` without `--debug`.
  """
  raw = sys.argv[1:] if argv is None else list(argv)
  debug = debug_requested(raw)
  try:
    code = main(strip_debug_flag(raw))
  except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
    if debug or not is_user_error(e):
      raise
    sys.exit(report(e, prog))
  sys.exit(code or 0)

