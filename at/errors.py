"""The errors that report bad input: one line naming the file, the key and what is allowed."""

import reprlib


class ParamsError(ValueError):
    """params.yaml (or a run spec) is malformed; the message names the key and the allowed values."""


class WriteError(RuntimeError):
    """A file could not be written (a full disk, a quota, a read-only file system); the message
    names the file, the reason and the free space, and the previous state is kept."""


# A value quoted in an error comes from the user's file and may be any size (a 300-digit number,
# a list of a million items): the message shows its start, a few items of a few levels, never
# all of it, so that the one line stays one line and building it costs nothing.
_SHOWN = reprlib.Repr()
for _key, _limit in {"maxstring": 60, "maxother": 60, "maxlong": 40, "maxlevel": 3, "maxlist": 4,
                     "maxtuple": 4, "maxdict": 4, "maxset": 4, "maxfrozenset": 4}.items():
    setattr(_SHOWN, _key, _limit)
SHOWN_MAX = 200   # characters of the whole repr, whatever its nesting


def shown(value) -> str:
    """``repr(value)`` for an error message, cut to at most :data:`SHOWN_MAX` characters."""
    try:
        text = _SHOWN.repr(value)
    except ValueError:   # an int beyond Python's 4300-digit str limit
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<value>"
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."
