"""User-facing errors: the CLI prints them as one line and exits 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (file, column, config key...). Message is one line, names the culprit."""

    exit_code = 2


class JobFailed(Exception):
    """A job ran and failed for a reason that is not bad input (diverged loss, worker crash...)."""

    exit_code = 1
