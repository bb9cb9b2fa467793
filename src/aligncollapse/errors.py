"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix (file, line or field named in the message)."""


class DataError(UserError):
    """A data file or row that does not have the expected shape."""


class NonFiniteError(Exception):
    """A loss, gradient or result that is NaN or infinite: the run stops with status ``diverged``."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class RunDiverged(Exception):
    """Raised to the CLI after a diverged run has written its results (exit status 3)."""
