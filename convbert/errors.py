"""One exception type for bad input: the CLI prints its message on one line, no traceback."""


class ConvBertError(Exception):
    """A user-facing error. The message names the file/line/field and what was expected."""
