"""What jaxkd's commands (`jaxkd.main`, `jaxkd.evaluate`, `jaxkd.import_teacher`,
`jaxkd.export_student`) share: only jaxkd's own lines on the terminal, and absl's flag parsing
with one-line errors.

Quiet libraries. Before anything imports TensorFlow, `quiet_environment` sets (unless already
set) `TF_CPP_MIN_LOG_LEVEL=2`, which hides TensorFlow's C++ INFO lines (CPU feature notices),
and `TF_ENABLE_ONEDNN_OPTS=0`, which ends TensorFlow's oneDNN notice (and with it absl's "All log
messages before absl::InitializeLog()" line that introduces it): TensorFlow computes nothing in
jaxkd (tfds prepares datasets with it, and reads files), so its oneDNN kernels change nothing
here. `quiet_libraries` then drops two tfds warnings that say nothing about the run (that PIL,
not OpenCV, decodes images; that a version folder of a dataset that is not prepared has no
metadata, which jaxkd's own error reports in one line), turns tfds' progress bars off (they
fill a log with escape codes when the digits are built) and numpy's overflow warning when a
config value float32 cannot hold becomes inf (a learning rate of 1e39: the divergence check
names it in its own line). With `-v`/`--verbosity` every library
line is shown as it comes.

Flags. `parse_flags` runs absl's parsing and ends a mistake with one line `error: …` on stderr
and exit status 2; `--help` (and `--helpshort`, `--helpfull`) print absl's help and exit 0.
"""

import logging
import os
import re
import sys
import warnings
from typing import Callable, Sequence

from jaxkd.errors import UserError

QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
# The format strings of the tfds warnings dropped (absl logs the format and its arguments).
NOISE = (
    "OpenCV is not installed. We recommend using OpenCV because it is faster according to our "
    "benchmarks. Defaulting to PIL to decode images...",
    "Variant folder %s has no %s",
)
_VERBOSE = re.compile(r"^--?(v|verbosity)(=|$)")
HELP = re.compile(r"^--?(help|helpshort|helpfull|helpxml|h|\?)(=|$)")


def verbose(argv: Sequence[str]) -> bool:
  """Whether the command line asks for the libraries' logs (`-v N`, `--verbosity=N`)."""
  return any(_VERBOSE.match(arg) for arg in argv[1:])


def quiet_environment(argv: Sequence[str]) -> None:
  """Sets the libraries' log levels in the environment (see the module docstring); call it
  before TensorFlow is imported. Nothing is changed with `-v` or where a variable is set."""
  if not verbose(argv):
    for name, value in QUIET_ENVIRONMENT.items():
      os.environ.setdefault(name, value)


class _DropNoise(logging.Filter):
  """Drops the log records whose format string is one of NOISE."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg not in NOISE


def quiet_libraries(verbose_logs: bool) -> None:
  """Unless `verbose_logs`: drops the NOISE warnings and turns tfds' progress bars off (tfds'
  own switch). Imports tfds; call it where the command reads a dataset."""
  if verbose_logs:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.display_progress_bar(False)
  warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropNoise) for f in absl_logger.filters):
    absl_logger.addFilter(_DropNoise())


def report(error: BaseException, status: int = 2) -> int:
  """Prints `error: …` (one line) on stderr; returns `status`."""
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  return status


def parse_flags(parse: Callable[[list[str]], list[str]], argv: Sequence[str],
                num_args: int = 0, usage: str = "") -> list[str]:
  """`parse(argv)` (absl's flag parsing) for an absl `app.run(..., flags_parser=)`.

  A flag mistake or a UserError ends the process with one `error:` line and exit status 2;
  a help flag with absl's help and exit status 0. The positional arguments must number
  `num_args` (`usage` says what they are).
  """
  argv = list(argv)
  try:
    rest = parse(argv)
  except SystemExit as e:
    sys.exit(help_exit_status(e, argv))
  except (UserError, _flag_errors()) as e:
    sys.exit(report(e))
  if len(rest) - 1 != num_args:
    given = f"unexpected arguments: {' '.join(rest[1:])}" if len(rest) - 1 > num_args else (
        "missing arguments")
    sys.exit(report(UserError(f"{given}; {usage}" if usage else given)))
  return rest


def help_exit_status(exit: SystemExit, argv: Sequence[str]) -> int:
  """The exit status of a SystemExit raised while parsing `argv`: 0 where absl printed the help
  a help flag asked for (absl exits with 1 then), else the exit's own."""
  if exit.code == 1 and any(HELP.match(arg) for arg in argv[1:]):
    return 0
  return exit.code


def _flag_errors() -> type:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.Error
