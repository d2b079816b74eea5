"""The product's own errors: one base class, so the CLI can tell a user's mistake from a bug.

Every subclass's message names the culprit (file, tensor, layer or option). Anything else that escapes a
command is a bug and is shown with its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


class CordaSurgeryError(Exception):
    """Bad input, options or files, or an output that cannot be written; the message says which.

    A message writes each option as its field name in backquotes (`rank`): ``str()`` gives the bare field
    name, as a library caller knows it; ``named`` gives the caller's own name for it (the command line: its flag).
    """

    def named(self, names: Mapping[str, str]) -> str:
        message = str(self.args[0]) if self.args else ""
        return re.sub(r"`(\w+)`", lambda match: names.get(match[1], match[1]), message)

    def __str__(self) -> str:
        return self.named({})


class UnsupportedArchitecture(CordaSurgeryError):
    """The checkpoint's layout cannot be streamed block by block (no block list, blocks that cannot be rebuilt,
    inputs whose tokens cannot be told apart)."""


class OptionsError(CordaSurgeryError):
    """An option's value is invalid or does not go with another option; names the option."""
