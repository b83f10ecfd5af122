"""The data errors, in a module that imports nothing heavy: the command-line tools raise them
before (or without ever) importing torch."""

# Python's json parser recurses once per nesting level; thousands of "[" exhaust the stack.
JSON_TOO_DEEP = "invalid JSON: nested too deeply to parse (a RecursionError)"


class DataError(ValueError):
    """Bad training data or a data layout/state that cannot be read; says which file and line."""


class BadLine(Exception):
    """What is wrong with one line; the reader adds file:line and decides to skip or raise."""
