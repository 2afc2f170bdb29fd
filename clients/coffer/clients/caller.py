"""The caller: who makes a call, named in the `coffer-caller` metadata. Idempotency keys are
scoped to it.

The one rule for a caller's name, defined once: the typed client checks it before it sends
anything, the server (which imports this module) refuses what it refuses. Standard library
only, so that both can use it.

- Every call that writes (all but Get… and List…) must send a caller; reads may, and a caller
  they send is checked the same way.
- A caller is 1 to `caller_length_max` visible ASCII characters: letters, digits and
  punctuation, no spaces.
- Callers starting with `caller_reserved_prefix` are the server's own (it expires holds as
  "@coffer"); no client may use one.
"""

from __future__ import annotations

import re

from coffer.clients.limits import caller_length_max

__all__ = ["caller_length_max", "caller_metadata_key", "caller_reserved_prefix", "check_caller"]

caller_metadata_key = "coffer-caller"
caller_reserved_prefix = "@"

_caller_pattern = re.compile(rf"[!-~]{{1,{caller_length_max}}}")


def check_caller(caller: object) -> str:
    """`caller` if it is a caller a client may use; else ValueError, saying what is wrong."""
    if not isinstance(caller, str) or not _caller_pattern.fullmatch(caller):
        raise ValueError(
            f"must be 1 to {caller_length_max} visible ASCII characters (letters, digits,"
            " punctuation; no spaces)"
        )
    if caller.startswith(caller_reserved_prefix):
        raise ValueError(f"must not start with {caller_reserved_prefix!r}: reserved for the server")
    return caller
