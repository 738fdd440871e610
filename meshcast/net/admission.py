"""Admission of new inbound connections: a rate limit per source address (sans-IO).

The design's security model asks for limits on join rates. A `Join` needs a connection and a
link carries at most one, so a node limits *new connections per source address*: each address
has a token bucket of `burst` connections that refills at `rate` a second. A crowd behind one
address (a household, a campus NAT, a test on 127.0.0.1) fits in the burst; a flood from one
address is cut to `rate`. The endpoint asks before it does any handshake work for a client's
first datagram, and drops what is refused: the client's connect times out, and a QUIC client
that retransmits its Initial gets in once its address has a token again.

The table of addresses is bounded. An address whose bucket has refilled carries no information
and is forgotten first; past `max_tracked` busy addresses (source addresses can be forged over
UDP), the oldest are forgotten too, which makes the limit fail open rather than shut out
everyone new. QUIC's address validation (Retry) is the defence against forged addresses; this is
not it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["Admission", "PER_IP_BURST", "PER_IP_RATE"]

PER_IP_RATE: Final = 10.0
"""New connections a second one source address may open, once its burst is spent."""
PER_IP_BURST: Final = 100
"""New connections one source address may open at once."""
LOG_EVERY_S: Final = 60.0
"""A refused address is reported again at most this often."""


class Admission:
    """Which new inbound connections to take: `admit(source, now)` (time from the caller)."""

    __slots__ = ("rate", "burst", "max_tracked", "refused", "_buckets", "_reported")

    def __init__(self, rate: float = PER_IP_RATE, burst: int = PER_IP_BURST, *,
                 max_tracked: int = 1 << 16) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"need a positive rate and a burst of at least 1, not {rate}, {burst}")
        if max_tracked < 2:
            raise ValueError(f"max_tracked must be at least 2, not {max_tracked}")
        self.rate, self.burst, self.max_tracked = float(rate), burst, max_tracked
        self.refused = 0
        """Connections refused so far."""
        self._buckets: dict[str, tuple[float, float]] = {}
        """Source → (tokens, when counted); oldest first."""
        self._reported: dict[str, float] = {}
        """Source → when a refusal of it was last reported."""

    def admit(self, source: str, now: float) -> bool:
        """Take a new connection from `source` at `now`? A True spends one of its tokens."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_tracked:
                self._prune(now)
            self._buckets[source] = (self.burst - 1.0, now)
            return True
        tokens = self._tokens(bucket, now)
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, now)
            return True
        self.refused += 1
        return False

    def exhaust(self, source: str, now: float) -> None:
        """`source` has spent its tokens elsewhere (another process taking the same address's
        connections: `meshcast.net.front`): refuse it until its bucket refills from empty."""
        if source not in self._buckets and len(self._buckets) >= self.max_tracked:
            self._prune(now)
        self._buckets.pop(source, None)  # re-inserted: now the newest
        self._buckets[source] = (0.0, now)

    def refusal(self, source: str) -> str:
        """The log line for refusing `source` (when `report` says to log one)."""
        return (f"refusing new connections from {source}: more than {self.burst} at once or "
                f"{self.rate:g} a second ({self.refused} refused in all)")

    def report(self, source: str, now: float) -> bool:
        """Should a refusal of `source` at `now` be logged (once per `LOG_EVERY_S` each)?"""
        last = self._reported.get(source)
        if last is not None and now - last < LOG_EVERY_S:
            return False
        if last is None and len(self._reported) >= self.max_tracked:
            self._reported = {s: t for s, t in self._reported.items() if now - t < LOG_EVERY_S}
            if len(self._reported) >= self.max_tracked:
                return False
        self._reported[source] = now
        return True

    def __len__(self) -> int:
        """Addresses tracked."""
        return len(self._buckets)

    def _tokens(self, bucket: tuple[float, float], now: float) -> float:
        tokens, then = bucket
        return min(float(self.burst), tokens + max(0.0, now - then) * self.rate)

    def _prune(self, now: float) -> None:
        """Forget refilled buckets; if that is not half the table, the oldest too."""
        keep = {s: b for s, b in self._buckets.items() if self._tokens(b, now) < self.burst}
        excess = len(keep) - self.max_tracked // 2
        if excess > 0:
            for source in list(keep)[:excess]:
                del keep[source]
        self._buckets = keep
