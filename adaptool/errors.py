"""The one exception type a user ever sees.

Every failure a user can cause (a bad path, a recipe typo, an adapter made for another model, NaN in a
tensor) is raised as an :class:`AdaptoolError` whose message is one line naming the problem and the fix.
The CLI prints that line and exits non-zero; anything else is a bug and shows as an internal error.
"""


class AdaptoolError(Exception):
    """A problem with the user's input or environment, explained in one line.

    Args:
        message (str): what is wrong, naming the file, tensor or key.
        hint (str | None): what to do about it. Default: None.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message
