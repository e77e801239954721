"""The one exception type users see for bad input: it names the problem and the fix."""


class EetError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it.

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """
