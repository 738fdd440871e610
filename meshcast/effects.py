"""What a node asks its driver to do. Nodes queue these; drivers pull them with `node.drain()`.

A `Link` is the driver's handle for one connection (an int). A node names the connections it
wants with `Open(address, ref)`; the driver answers `link_opened(link, ref=ref)` or
`open_failed(ref, reason)`. After a node emits `Close(link)` the driver does not report that
link again. Chunks travel on a stream of their own, as `ChunkBegin` → `ChunkBytes`* → `ChunkEnd`
while a relay forwards bytes as they come (cut-through), or as one `SendChunk` to all its
targets when the node holds the whole chunk already (the seed, a pull answer, a chunk that
arrived in one piece). The runtime writes bytes as they come, the simulator times them with its
link model.

Effects are slotted dataclasses, not frozen ones: a relay makes one to three per child per
chunk, and a frozen dataclass's constructor costs twice as much. Nobody mutates one after it is
queued. Each writes its own `__init__`: a compiled build (mypyc) compiles that one, but runs a
dataclass-generated one interpreted, six times slower (`tests/unit/test_records.py` keeps the
two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from meshcast.messages import ChunkHead, Message

Link = int


class Chunk(NamedTuple):
    """A whole chunk as a node keeps it (`RelayNode._ring`) and sends it (`SendChunk`).

    Immutable, so a relay passes on the very object it received: a simulated swarm then holds
    each chunk once, not once per peer."""

    head: ChunkHead
    payload: bytes


@dataclass(slots=True)
class Send:
    """Send a control message on `link`."""

    link: Link
    msg: Message

    def __init__(self, link: Link, msg: Message) -> None:
        self.link = link
        self.msg = msg


@dataclass(slots=True)
class Open:
    """Connect to `address`; `ref` comes back in `link_opened`/`open_failed`."""

    address: str
    ref: Any

    def __init__(self, address: str, ref: Any) -> None:
        self.address = address
        self.ref = ref


@dataclass(slots=True)
class Close:
    """Close `link`; `reason` is shown to the other side."""

    link: Link
    reason: str

    def __init__(self, link: Link, reason: str) -> None:
        self.link = link
        self.reason = reason


@dataclass(slots=True)
class ChunkBegin:
    """Open a chunk stream on `link` and write its head."""

    link: Link
    head: ChunkHead
    push: bool = True
    """A subscriber's chunk as it goes by (True), or one from spare upload only (False): an
    answer to a pull, or a new subscriber's catch-up. Under back-pressure a driver gives up
    these first (`meshcast.policy.drop_chunk`), and tells the node with the flag."""

    def __init__(self, link: Link, head: ChunkHead, push: bool = True) -> None:
        self.link = link
        self.head = head
        self.push = push


@dataclass(slots=True)
class ChunkBytes:
    """Append payload bytes to the chunk stream `seq` on `link`."""

    link: Link
    seq: int
    data: bytes

    def __init__(self, link: Link, seq: int, data: bytes) -> None:
        self.link = link
        self.seq = seq
        self.data = data


@dataclass(slots=True)
class ChunkEnd:
    """Finish the chunk stream: `ok` commits it; not ok aborts it (upstream data was bad)."""

    link: Link
    seq: int
    ok: bool

    def __init__(self, link: Link, seq: int, ok: bool) -> None:
        self.link = link
        self.seq = seq
        self.ok = ok


@dataclass(slots=True)
class SendChunk:
    """Send a whole chunk to each of `links`, on a stream of its own: `ChunkBegin`, `ChunkBytes`,
    `ChunkEnd` in one, in the order of `links`.

    One effect for all of a chunk's children, not one each: a relay pushes to several, and an
    effect per child was a tenth of a simulated delivery's cost (made, queued, dispatched)."""

    links: list[Link]
    chunk: Chunk
    push: bool = True
    """As `ChunkBegin.push`."""
    ok: bool = True
    """As `ChunkEnd.ok`: a relay also passes on, aborted, a chunk that failed verification."""

    def __init__(self, links: list[Link], chunk: Chunk, push: bool = True, ok: bool = True) -> None:
        self.links = links
        self.chunk = chunk
        self.push = push
        self.ok = ok


@dataclass(slots=True)
class Deliver:
    """A verified chunk for the player, in stream order."""

    head: ChunkHead
    payload: bytes
    latency: float
    """Seconds from the seed's `head.ts` to verification here (same clock in sim and on one host)."""
    from_seed: bool
    """The chunk came straight from the seed (not relayed by a peer)."""
    on_time: bool = True
    """Handed over by its playback deadline (a chunk held up behind an earlier one may not be)."""

    def __init__(self, head: ChunkHead, payload: bytes, latency: float, from_seed: bool,
                 on_time: bool = True) -> None:
        self.head = head
        self.payload = payload
        self.latency = latency
        self.from_seed = from_seed
        self.on_time = on_time


@dataclass(slots=True)
class Skip:
    """The player gives up on chunk `seq`: it missed its playback deadline."""

    seq: int

    def __init__(self, seq: int) -> None:
        self.seq = seq


@dataclass(slots=True)
class Notice:
    """Something an operator should see in the log (a link cut for cause, a rejection)."""

    text: str

    def __init__(self, text: str) -> None:
        self.text = text


Effect = (Send | Open | Close | ChunkBegin | ChunkBytes | ChunkEnd | SendChunk | Deliver | Skip
          | Notice)
