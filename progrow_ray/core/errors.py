"""One exception type for every user mistake, so CLIs can print one line and exit 2."""


class ConfigError(ValueError):
    """Bad user input: the message names the field and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
