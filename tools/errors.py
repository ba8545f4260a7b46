class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit 2."""


class RunError(Exception):
    """A run that cannot go on (a non-finite loss, say): printed as one line, exit 1."""


class ImageError(UserError):
    """An image file that cannot be read as a film: ``path``, what is wrong with it (``reason``)
    and what to do (``advice``), printed as ``image <path>: <reason>; <advice>``. The decode cache
    keeps the reason of each such row, so the error that stops a run can say what the file is."""

    def __init__(self, path, reason: str, advice: str = "replace it or pass --skip-bad-images"):
        self.path, self.reason, self.advice = str(path), reason, advice
        super().__init__(f"image {path}: {reason}" + (f"; {advice}" if advice else ""))
