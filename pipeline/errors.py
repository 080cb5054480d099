"""The two kinds of failure a CLI reports in one line (exit 2); anything else is a bug and keeps its traceback.

Raise them where the cause is known: :class:`UserError` for a flag, path or recipe
the user can correct, :class:`DataError` for data that cannot be used. They derive
from ``ValueError`` so callers that guard a conversion keep working, but a CLI
maps only these two to exit 2: a ``ValueError`` raised deep inside a library is a
bug to report, not the user's mistake.
"""

from __future__ import annotations


class UserError(ValueError):
    """A flag, path, recipe or run folder the user gave that cannot be used; the message says which and why."""


class DataError(ValueError):
    """Data that cannot be used (a manifest, a task, a shard); the message names the file and what is wrong."""


USER_EXIT = 2  # the exit code of a UserError or DataError in every CLI
