"""The errors m3w reports to the person running it, as opposed to bugs.

The CLI (m3w/cli.py) prints a `UserError` as one line on stderr and exits with status 2 (`m3w --debug ...` shows
the traceback); any other exception is a bug in m3w and keeps its traceback. Raise a `UserError` for input the
user can fix: a path, a config value, a file in another format. A unit that fails while a stage runs is not a
`UserError`: it is recorded in the stage manifest and retried by the next run.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix. The message names the problem and, where it helps, the fix, in one line."""


class ConfigError(UserError, ValueError):
    """A config that does not match its dataclass: bad YAML, an unknown key, a wrong type, an invalid value."""


class FormatError(UserError, ValueError):
    """A file that is not in the format it is read as: not parquet at all, another m3w format, another schema
    version. Said in the driver, it is one line; said in a unit, the unit fails with it (and is retried)."""
