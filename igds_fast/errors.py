"""One exception type for bad input: a one-line message that names the problem.

Raised before any expensive work (model builds, sampling) starts.
"""


class IGDSInputError(ValueError):
    """Bad user input (arguments, checkpoints, data). The message is one line and names the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
