"""The one exception type a user sees as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input (config, data, files): the CLI prints ``error: <message>`` and exits with ``exit_code``.

    Messages name the config key or file and what was expected, on one line.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
