"""User-facing errors of the runtime: the CLI prints the message and exits 2, no traceback."""


class RuntimeInputError(ValueError):
    """Bad input ids, a model folder or file that cannot be used, or a provider that is not available."""

    exit_code = 2
