"""One exception type for bad input: a one-line message that names the problem.

Raised before any expensive work (model builds, sampling) starts.
"""


class IGDSInputError(ValueError):
    """Bad user input (arguments, checkpoints, data). The message is one line and names the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class IGDSNumericsError(IGDSInputError):
    """A fast path disagrees with the float32 reference beyond its tolerance (the compiled backend's
    first-step self-check). One line naming the module and the error; the CLI reports it like bad
    input (exit code 2), before a run writes a single image."""
