"""The one error type prefopt raises for bad input and impossible option combinations."""


class PrefoptError(ValueError):
    """Bad input or configuration. The message names what is wrong and what is allowed.

    One raised in a ``DataLoader`` worker process (an image that does not decode, say) reaches the main process
    rebuilt by torch from a text of the worker's traceback ("Caught PrefoptError in DataLoader worker process 0.
    Original Traceback ..."); such a text is cut back to the error's own line and the worker's name, so the
    user still gets one line.
    """

    def __init__(self, message: object = "", *args: object):
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            where = text.split(".\n", 1)[0].removeprefix("Caught ")
            last = [line for line in text.splitlines() if line.strip()][-1]
            text = f"{last.partition(': ')[2] or last} ({where.partition(' ')[2]})"
        super().__init__(text, *args)


def check_choice(option: str, value, allowed) -> None:
    """Raise a PrefoptError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise PrefoptError(f"{option}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
