"""The one exception type for bad input.

Library code raises `UserError` with a message that says what is wrong and what to do;
the CLI prints it as a single line and exits with status 2. Anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user: a one-line message, no traceback."""
