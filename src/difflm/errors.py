"""The one exception type for a user's mistake: the CLI prints its message on one line, no traceback."""


class DiffLMError(Exception):
    """A problem with the user's input (path, data, config, checkpoint) and how to fix it."""
