"""User-facing errors.

Every error a user can cause (bad option, bad file, bad manifest) is raised as a
``MedpeftError`` whose message names the offending value and says what was expected.
The CLI prints such errors as one clean line instead of a traceback.
"""


class MedpeftError(Exception):
    """An error caused by user input; the message names the value and what was expected."""


class DataError(MedpeftError, ValueError):
    """Bad data: missing/corrupt file, bad manifest, bad split or subset request."""


class ConfigError(MedpeftError, ValueError):
    """Bad option or configuration value (unknown name, out-of-range number, ...)."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    """Error for an unknown registry name that lists the valid choices."""
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
