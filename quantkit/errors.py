"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class QuantkitError(Exception):
    """A user-facing problem: bad input, missing files, failed validation."""
