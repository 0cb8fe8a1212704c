"""The one base class for errors a user can fix: the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input, configuration or file; the message says what and where."""
