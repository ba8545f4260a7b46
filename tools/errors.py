class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit 2."""


class RunError(Exception):
    """A run that cannot go on (a non-finite loss, say): printed as one line, exit 1."""
