"""User-facing errors.

A `VlmbatchError` is a mistake a person can fix (a missing model, an unknown column, an unwritable
output). The CLI prints its message as one line and exits non-zero; tracebacks appear only with --debug.
"""


class VlmbatchError(Exception):
    """A fatal, user-fixable problem. The message must make sense on its own, in one line."""


class ImageDecodeError(Exception):
    """One input image could not be decoded; it becomes a row with `error` set, never a crash."""


class VlmbatchWarning(UserWarning):
    """Something done that a person should know of (a damaged file moved aside); the CLI prints it in one line."""
