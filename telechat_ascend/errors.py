"""The error every user-facing failure of the shared core raises."""


class TeleChatError(ValueError):
    """Bad input: a config field, a checkpoint file or tensor, a data line. The message names it."""
