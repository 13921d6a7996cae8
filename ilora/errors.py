"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class RunInterrupted(Exception):
    """A run stopped by something outside it (e.g. a federation node failed): nothing is recorded, the
    checkpoint stays, and rerunning resumes. The CLI prints it as one line and exits with code 1."""


class UserError(Exception):
    """Bad config, missing data or files: the message says what and lists valid choices."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


class DataUnavailable(UserError):
    """A dataset or model that is not in the local cache and cannot be fetched here."""
