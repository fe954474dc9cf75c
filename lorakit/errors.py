"""The one exception type that reaches users as a readable paragraph instead of a traceback."""


class LorakitError(Exception):
    """A problem the user can fix. The message names the file/key and says what to do."""

    exit_code = 1


class ConfigError(LorakitError):
    """Bad configuration: unknown key, wrong type, bad preset name or value out of range."""

    exit_code = 2
