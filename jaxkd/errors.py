"""The one exception type that means "the user asked for something we cannot do".

`jaxkd.main` turns it into a single line on stderr and its exit status (2; 3 for a diverged
run; 4 for a multi-process run that lost one of its processes; 128 + the signal for an
interrupted one), instead of a traceback.
Raise it with a message that names the bad value and says how to fix it.
"""

from typing import Iterable


class UserError(Exception):
  """Bad input: unknown name, wrong shape, missing data, unwritable path, ..."""
  exit_status = 2


class Diverged(UserError):
  """A loss term or the gradient went non-finite; the last good checkpoint is kept."""
  exit_status = 3


class LostProcess(UserError):
  """Another process of a multi-process run is gone; this one stops (jaxkd.distributed)."""
  exit_status = 4


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
  """A UserError for an unknown registry name that lists every valid one."""
  return UserError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
