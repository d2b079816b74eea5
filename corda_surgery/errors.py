"""The product's own errors: one base class, so the CLI can tell a user's mistake from a bug.

Every subclass's message names the culprit (file, tensor, layer or option). Anything else that escapes a
command is a bug and is shown with its traceback.
"""


class CordaSurgeryError(Exception):
    """Bad input, options or files, or an output that cannot be written; the message says which."""


class UnsupportedArchitecture(CordaSurgeryError):
    """The checkpoint's layout cannot be streamed block by block (no block list, blocks that cannot be rebuilt,
    inputs whose tokens cannot be told apart)."""


class OptionsError(CordaSurgeryError):
    """An option's value is invalid or does not go with another option; names the option."""
