"""The errors that report bad input: one line naming the file, the key and what is allowed."""


class ParamsError(ValueError):
    """params.yaml (or a run spec) is malformed; the message names the key and the allowed values."""


class WriteError(RuntimeError):
    """A file could not be written (a full disk, a quota, a read-only file system); the message
    names the file, the reason and the free space, and the previous state is kept."""
