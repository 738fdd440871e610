"""The two kinds of protocol error (h11's split).

`LocalProtocolError`: our own caller misused an API — a bug; let it raise.
`RemoteProtocolError`: the other end broke the protocol — close that one link with the
message as the reason, score the sender, keep serving everyone else.
"""


class MeshcastError(Exception):
    """Base class of meshcast's own errors."""


class LocalProtocolError(MeshcastError):
    """We were asked to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(MeshcastError):
    """A remote sent something malformed, oversized, forged or out of place."""
