"""User-facing errors.

Anything the user can fix (a wrong path, a bad file, an inconsistent option) is raised as
``VpgtransError`` with a one-line message that says what is wrong and what to do. The CLI turns it
into that line on stderr and exit code 2, with no traceback.
"""


class VpgtransError(Exception):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""

