"""Errors meant for the user: the CLI prints them as one message, without a traceback."""


class UserError(Exception):
    """Bad input (a config key, a file, an argument): the message says which and what was expected."""
