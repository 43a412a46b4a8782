"""One exception type for bad input: the CLI prints its message on one line, no traceback."""


class ConvBertError(ValueError):
    """A user-facing error. The message names the file/line/field and what was expected.

    A `ValueError`, since every case is a bad value (a config field, a file's contents, a flag), so callers that
    catch `ValueError` catch these too.
    """
