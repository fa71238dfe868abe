"""User-facing errors.

Raise :class:`FgvceError` for anything a user can fix (bad arguments, missing
files, wrong architecture for a checkpoint). The CLI prints its message as one
line and exits with status 2, without a traceback.
"""


class FgvceError(Exception):
    """An error caused by the user's input, reported as one clear line."""
