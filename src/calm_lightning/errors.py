"""The one exception type for failures a user can fix (bad config, missing artefact, bad corpus).

The CLI catches it once and prints its message as a single line with exit code 2; anything else is a
bug and keeps its traceback.
"""


class CalmError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""

    exit_code = 2
