"""One exception type for everything a user can get wrong.

The CLI turns an :class:`ActsparseError` into a one-line message and exit code 2, so every
check on user input (model, file, sparsity, path) raises this and nothing else.
"""


class ActsparseError(Exception):
    """A problem with the user's input: bad model, file, option or path."""
