"""Errors that mean "the input is wrong", reported to the user as one line (no traceback)."""


class ConfigError(ValueError):
    """A bad configuration value or input file; the message names it and what is accepted."""
