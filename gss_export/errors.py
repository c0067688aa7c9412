"""User-facing errors: the CLI prints their message on one screen and exits non-zero, no traceback."""


class GSSExportError(Exception):
    """Bad input or a failed step the user can act on. `exit_code` is what the CLI returns."""

    exit_code = 2


class CheckpointError(GSSExportError):
    """A checkpoint that is missing, unreadable, unsafe to load, or does not fit the model."""


class ValidationFailed(GSSExportError):
    """An exported artifact disagrees with eager PyTorch beyond tolerance; `report` says where."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
