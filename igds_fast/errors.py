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


class IGDSDiskFullError(IGDSInputError):
    """The disk filled up while an output was written (ENOSPC / EDQUOT). `folder` names where.

    Raised by the atomic writers after removing their temporary file, so nothing partial is left
    under a final name; a command that resumes (distill) adds that rerunning it resumes. The CLI
    prints it as one line like bad input (exit code 2).
    """

    def __init__(self, folder: str, message: str | None = None):
        self.folder = folder
        super().__init__(message or f"no space left on the device holding {folder}; nothing partial was kept "
                                    "(free space and rerun)")
