"""The one exception type for mistakes a user can fix (bad config, bad input file).

The CLI turns it into a one-line message and exit code 2; everything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input, reported without a traceback."""
