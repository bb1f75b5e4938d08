"""Errors raised when reading data sets."""


class DataError(ValueError):
    """A data file or data source that cannot be read as problems.

    The message names the file and, for a malformed line, its 1-based line number
    (`train.jsonl:17: missing field "answer"`).
    """
