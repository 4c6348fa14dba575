"""The one exception type that means "the user asked for something we cannot do".

`jaxkd.main` turns it into a single line on stderr and exit status 2, instead of a traceback.
Raise it with a message that names the bad value and says how to fix it.
"""

from typing import Iterable


class UserError(Exception):
  """Bad input: unknown name, wrong shape, missing data, unwritable path, ..."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
  """A UserError for an unknown registry name that lists every valid one."""
  return UserError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
