"""The one exception type every stage raises for bad input.

The CLI catches :class:`CleanError` and prints its message (no traceback), exit code 2.
Messages name the thing that is wrong (file, key, id) and say how to fix it.
"""


class CleanError(Exception):
    """A user-facing error: bad input, bad param, missing file. Message is shown as is."""
