"""The root of every error vnetbackend raises.

Each stage defines its own errors beside the code that raises them, all under
`VnetError`, so a caller can catch everything the project raises in one clause, or one
stage's errors by their class. An error that is also a kind of a builtin error keeps
that builtin as a second base (an out-of-range value is a `ValueError`, a failed system
call an `OSError`, a missing device a `LookupError`), so code that catches the builtin
still does.
"""


class VnetError(Exception):
    """Something vnetbackend could not do; the message says what and with which value."""
