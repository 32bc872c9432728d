"""Errors a user can act on; the CLI prints their message as one line instead of a traceback."""


class SkindiffError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class DataValidationError(SkindiffError, ValueError):
    """Metadata or image files that do not meet the dataset contract."""


def require(condition: bool, message: str) -> None:
    """Raises SkindiffError(message) unless `condition`: one-line checks of user parameters."""
    if not condition:
        raise SkindiffError(message)
