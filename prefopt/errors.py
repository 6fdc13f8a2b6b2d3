"""The one error type prefopt raises for bad input and impossible option combinations."""


class PrefoptError(ValueError):
    """Bad input or configuration. The message names what is wrong and what is allowed."""


def check_choice(option: str, value, allowed) -> None:
    """Raise a PrefoptError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise PrefoptError(f"{option}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
