"""SeedNode: the root of every sub-stream tree; signs what the broadcaster sends (sans-IO).

The driver feeds it media chunks (`ingest`), already cut on container boundaries by
`seed.ingest`. The seed numbers and signs each one, keeps a window for pulls, and pushes it to
the children the tracker gave it in that chunk's sub-stream. It is also every peer's source of
last resort for pulls. Its own admission rules are `RelayNode`'s: a token from the tracker and
a free slot.
"""

from __future__ import annotations

from typing import Any, Final

from meshcast import messages as m
from meshcast.crypto import Crypto
from meshcast.effects import Chunk, Link, Notice, Open, Send
from meshcast.errors import RemoteProtocolError
from meshcast.node import Conn, RelayNode

TRACKER: Final = "tracker"
RECONNECT_S: Final = 2.0


def live_first_seq(unix_s: float, chunk_ms: int) -> int:
    """The sequence number a live seed starts from: chunk periods since the Unix epoch.

    Viewers play by sequence number and drop what is older than what they played, so a seed
    restarted from 0 would be ignored until it caught up with the old one (as long as that one
    had been live). From the wall clock, a restart (same chunk length) goes on a little after
    where the old seed stopped, and its viewers skip only the outage."""
    return int(unix_s * 1000) // chunk_ms


class SeedNode(RelayNode):
    """Signs and pushes one channel's chunks."""

    __slots__ = ("key", "tracker", "address", "next_seq", "rejected", "chunks_sent")

    def __init__(self, *, channel: str, key: Any, crypto: Crypto, tracker: str, address: str,
                 upload_kbps: int, bitrate_kbps: int, substreams: int = 4, chunk_ms: int = 200,
                 buffer_s: float = 10.0, first_seq: int = 0) -> None:
        """`first_seq`: the first chunk's sequence number (a live seed: `live_first_seq`)."""
        super().__init__(crypto=crypto, upload_kbps=upload_kbps, buffer_s=buffer_s)
        self.key = key
        self.tracker = tracker
        self.address = address
        self._configure(channel, key.public, b"", substreams, chunk_ms, bitrate_kbps)
        self.next_seq = first_seq
        self.rejected = ""
        self.chunks_sent = 0

    def start(self, *, now: float) -> None:
        self._out.append(Open(self.tracker, TRACKER))

    # -- tracker link ----------------------------------------------------------------------

    def link_opened(self, link: Link, *, now: float, ref: Any = None) -> None:
        super().link_opened(link, now=now, ref=ref)
        if ref == TRACKER:
            self.tracker_link = link
            proof = self.crypto.sign_announce(self.key, self.channel, self.address)
            self._out.append(Send(link, m.Announce(self.channel, self.key.public, self.address,
                                                   self.upload_kbps, self.bitrate_kbps,
                                                   self.substreams, self.chunk_ms, proof,
                                                   self.id, self.tracker_key,  # (if back)
                                                   self._children())))

    def open_failed(self, ref: Any, *, now: float, reason: str = "") -> None:
        if ref == TRACKER:
            self._out.append(Notice(f"tracker unreachable ({reason}); retrying in {RECONNECT_S:g} s"))
            self._set_timer(TRACKER, now + RECONNECT_S)

    def _conn_lost(self, conn: Conn, now: float, reason: str) -> None:
        if conn.link == self.tracker_link:
            self.tracker_link = None
            if not self.rejected:
                self._out.append(Notice(f"lost the tracker ({reason}); reconnecting"))
                self._set_timer(TRACKER, now + RECONNECT_S)

    def _on_timer(self, key: Any, now: float) -> None:
        if key == TRACKER:
            self.start(now=now)
        else:
            super()._on_timer(key, now)

    def _dispatch_other(self, conn: Conn, msg: m.Message, now: float) -> None:
        if conn.link != self.tracker_link:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a peer")
        if type(msg) is m.Welcome:
            self.id, self.mode = msg.node_id, msg.mode
            self._tracker_key_is(msg.tracker_key, now)
            self._start_haves(now)
        elif type(msg) is m.Reject:
            self.rejected = msg.reason
            self._out.append(Notice(f"tracker refused the channel: {msg.reason}"))
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the tracker")

    # -- media in --------------------------------------------------------------------------

    def ingest(self, payload: bytes, *, rap: bool, now: float) -> m.ChunkHead:
        """Number, sign, store and push one media chunk; returns its head."""
        seq = self.next_seq
        self.next_seq += 1
        head = self.crypto.sign_chunk(self.key, self.channel, seq, m.FLAG_RAP if rap else 0,
                                      now, payload)
        self._store(Chunk(head, payload))
        targets = self._push_targets(seq)
        if targets:
            self._send_chunk(targets, seq)
        self.chunks_sent += 1
        return head
