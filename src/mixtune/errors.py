"""Errors that mean "the user's input is wrong": the CLI prints them in one line and exits 2."""


class MixtuneError(Exception):
    """Bad input: a config, a data file, weights or a run directory the user must fix."""


class ConfigError(MixtuneError):
    """A config field is unknown, of the wrong type, or holds an impossible value."""


class DataError(MixtuneError):
    """A data source is missing, malformed or empty."""


class OutOfSpace(Exception):
    """The disk (or quota) filled up while writing: the CLI prints one line and exits 1 -- not
    bad input, and nothing half-written is left as the latest checkpoint."""


class TrainingError(MixtuneError):
    """Training cannot go on (for example a non-finite loss); the run directory is left intact."""
