"""The two failures every rank learns of at the same point, reported once by rank 0. Imports nothing, so that any
module may raise them (the config describes values; the checks that touch the world raise them too)."""


class ConfigError(ValueError):
    """Bad user input: printed as one line by rank 0, then every rank exits with status 2."""


class JobError(RuntimeError):
    """A failure every rank learns of at the same point (a failed sync check): rank 0 reports it once, status 1."""
