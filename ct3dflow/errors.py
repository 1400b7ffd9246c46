"""Errors a user can act on."""


class CTInputError(ValueError):
    """A study that cannot be used as it is.

    The message says what is wrong and what to do about it; batch code turns it into one
    ``error`` row of the summary/results and goes on with the other studies.
    """
