"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix (file, line or field named in the message)."""


class DataError(UserError):
    """A data file or row that does not have the expected shape."""
