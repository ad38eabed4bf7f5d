"""The one exception the command line turns into a one-line message and exit status 2."""


class UserError(ValueError):
    """Bad input from the user: a config key, a value, a file. The message is one line saying what is
    wrong and how to fix it; the CLI prints it as `flatrobust: error: ...` and exits with status 2."""
