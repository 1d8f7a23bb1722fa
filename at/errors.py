"""The errors that report bad input: one line naming the file, the key and what is allowed."""


class ParamsError(ValueError):
    """params.yaml (or a run spec) is malformed; the message names the key and the allowed values."""
