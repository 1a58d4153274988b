"""Command-line plumbing shared by train.py and the sweep: flag errors.

absl and ml_collections report a bad command line with a traceback from deep
inside themselves (a mistyped ``--config.KEY`` is a KeyError or an
AttributeError, a config file that does not load raises on first use). These
helpers turn each into one ``error: ...`` line naming the flag or file, and
exit with status 1.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run(main, flags_parser=parse_flags)``: absl's parsing, one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # flags.Error, KeyError, OSError, SyntaxError
    sys.exit(f"error: {flag_error_message(error, argv)}")


def flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line for an error of absl or ml_collections about ``argv``."""
  return _unknown_key_message(error, argv) or one_line(error)


def define_config_file(default: str, help_text: str) -> Any:
  """``config_flags.DEFINE_config_file("config", ...)``, one line on error.

  ml_collections reads the default file and applies ``--config.KEY``
  overrides right here, before absl parses anything else.
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file("config", default, help_text,
                                           lock_config=True)
  except Exception as error:  # pylint: disable=broad-except
    sys.exit(f"error: {flag_error_message(error, sys.argv)}")


def load_config(config_flag: Any, filename: str) -> Any:
  """The value of an ml_collections config-file flag, or exits with a line.

  Args:
    config_flag: from ``config_flags.DEFINE_config_file``.
    filename: the file it names (``flags.FLAGS[name].config_filename``).
  """
  try:
    config = config_flag.value
    config.to_dict()  # a file that failed to load raises on first use
    return config
  except Exception as error:  # pylint: disable=broad-except
    lines = str(error.__cause__ or error).strip().splitlines() or [""]
    sys.exit(f"error: --config={filename}: cannot load it "
             f"({lines[-1].strip() or type(error).__name__})")


def _unknown_key_message(error: Exception, argv: list[str]) -> str | None:
  """Names the ``--config.KEY`` flag that ml_collections did not find."""
  if not isinstance(error, (KeyError, AttributeError)):
    return None
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # AttributeError(KeyError(message))
  text = str(error.args[0] if error.args else error).strip("'\"")
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  given = [a.split("=")[0] for a in argv
           if a.startswith("--config.") and key in a.split("=")[0].split(".")]
  if not given:
    return None
  hint = hint.strip() or "see configs/default.py for every key"
  return f"{given[0]}: no such config key ({hint})"


def one_line(error: BaseException) -> str:
  """The error's message with its lines joined."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return " ".join(lines) or type(error).__name__
