"""The one error type for user mistakes (STYLE rule 8).

Asserts are for our bugs. M3Error is for bad input: its message names the thing, says why,
and gives the fix. The CLI turns it into one red stderr line and exit code 1.
"""


class M3Error(Exception):
    """A user-facing error: what is wrong, why, and how to fix it, in one line."""
