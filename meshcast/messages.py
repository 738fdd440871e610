"""Every message meshcast nodes exchange, as small frozen dataclasses (one module, aioquic-style).

The same classes are sent and received. `meshcast.wire` turns them into msgpack with a protocol
version and a type tag, and validates every field on decode against the `SCHEMA` below, so a
decoded message can be trusted to have the documented types and ranges. Each class writes its
own `__init__`, as `meshcast.effects` explains: a compiled build runs a dataclass-generated one
interpreted.

Who sends what:

- seed → tracker: `Announce`; tracker → seed: `Welcome`, `Reject`.
- peer → tracker: `Join`, `Leave`, `ParentLost`, `Complaint`; tracker → peer: `Welcome`,
  `Assign`, `Neighbours`, `Reject`.
- between nodes (child → parent, neighbour ↔ neighbour): `Hello`, `Subscribe`, `Unsubscribe`,
  `Refuse`, `Have`, `Request`, `Missing`.
- a chunk travels on its own stream: a `ChunkHead` frame, then exactly `size` payload bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

PROTOCOL_VERSION: Final = 4
"""Raised whenever a message changes shape, so mismatched builds refuse each other by version,
not by a field count (2: `Join.resume`, `Announce.resume_id`/`resume_key`, `Neighbours.seed_id`,
`Assign` without a token, `Waiting`; 3: `Resume.children`, `Announce.resume_children`;
4: `Token.sig` may carry a batch)."""

MAX_CHANNEL: Final = 64
"""Longest channel name, in characters."""
MAX_ADDRESS: Final = 128
MAX_REASON: Final = 256
MAX_CHUNK: Final = 4 * 1024 * 1024
"""Largest chunk payload accepted from the wire (bytes)."""
MAX_SUBSTREAMS: Final = 16
MAX_LIST: Final = 256
"""Longest list inside a control message (seqs, neighbours)."""
MAX_BITMAP: Final = 512
"""Longest have-map, in bytes (4096 chunks: minutes of stream)."""
SIG_LEN: Final = 64
TOKEN_DIGEST: Final = 16
"""Bytes of a token's digest in a batch (BLAKE2b, 128-bit second-preimage resistance)."""
TOKEN_SALT: Final = 8
"""Random bytes hashed into each batched token's digest and carried by that token alone: a
parent shown one token cannot find what the others in its batch are (a child's other
parents) by hashing guesses, as it could from digests of the fields only."""
TOKEN_BATCH: Final = 16
"""Most tokens signed together (a batch of 256 bytes rides in each one's `sig`)."""
KEY_LEN: Final = 32
NO_PEER: Final = -1
"""`id` meaning "nobody" (e.g. no backup parent, no mesh substream)."""


@dataclass(frozen=True, slots=True)
class PeerRef:
    """Where to reach a node."""

    id: int
    """Node id, assigned by the tracker."""
    address: str
    """Transport address ("host:port" on the network, an opaque name in the simulator)."""

    def __init__(self, id: int, address: str) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "address", address)


NO_REF: Final = PeerRef(NO_PEER, "")
"""No node (a `Resume` entry for a sub-stream without a parent)."""


@dataclass(frozen=True, slots=True)
class Token:
    """The tracker's permission for `child` to take media from `parent`.

    Short-lived and signed by the tracker; a parent checks it before accepting a child, so only
    the tracker decides who relays to whom and no parent is oversubscribed by strangers.
    """

    child: int
    parent: int
    channel: str
    substream: int
    """The push sub-stream the child may subscribe to; `NO_PEER` (-1): pull and have-maps only."""
    expires: float
    """Tracker clock, seconds."""
    sig: bytes
    """Tracker's Ed25519 signature over the other fields (`SIG_LEN` bytes). Or, for tokens
    signed together (`Crypto.issue_tokens`), the signature over their batch, this token's salt
    (`TOKEN_SALT`), then the batch: the `TOKEN_DIGEST`-byte digest of each one's salt and
    fields, this one's among them. (One field, not three: a simulated audience of 100k holds
    half a million tokens.)"""

    def __init__(self, child: int, parent: int, channel: str, substream: int, expires: float,
                 sig: bytes) -> None:
        object.__setattr__(self, "child", child)
        object.__setattr__(self, "parent", parent)
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "expires", expires)
        object.__setattr__(self, "sig", sig)


# -- seed ↔ tracker ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announce:
    """A seed offers a channel."""

    channel: str
    public_key: bytes
    """The channel's Ed25519 public key; every chunk is signed with the matching private key."""
    address: str
    """Where children reach the seed."""
    upload_kbps: int
    bitrate_kbps: int
    """Expected media bitrate; the tracker's capacity accounting is in units of bitrate/K."""
    substreams: int
    chunk_ms: int
    proof: bytes
    """Signature with the channel key over (channel, address): proves the seed holds the key."""
    resume_id: int = NO_PEER
    """Back at a (restarted) tracker: the id this seed had, which its children still name."""
    resume_key: bytes = b""
    """... and the key of the tracker that gave it: its viewers prove their own ids with tokens
    that key signed."""
    resume_children: int = 0
    """... and how many children it feeds (as `Resume.children`)."""

    def __init__(self, channel: str, public_key: bytes, address: str, upload_kbps: int,
                 bitrate_kbps: int, substreams: int, chunk_ms: int, proof: bytes,
                 resume_id: int = NO_PEER, resume_key: bytes = b"",
                 resume_children: int = 0) -> None:
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "upload_kbps", upload_kbps)
        object.__setattr__(self, "bitrate_kbps", bitrate_kbps)
        object.__setattr__(self, "substreams", substreams)
        object.__setattr__(self, "chunk_ms", chunk_ms)
        object.__setattr__(self, "proof", proof)
        object.__setattr__(self, "resume_id", resume_id)
        object.__setattr__(self, "resume_key", resume_key)
        object.__setattr__(self, "resume_children", resume_children)


# -- peer ↔ tracker ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    """A viewer asks to watch a channel."""

    channel: str
    address: str
    """Where this peer accepts children ("" if it cannot: behind NAT, or upload 0)."""
    upload_kbps: int
    coords: tuple[float, ...] = ()
    """Network coordinates (e.g. Vivaldi), if the peer has them; the tracker places by distance."""
    resume: Resume | None = None
    """Back at a (restarted) tracker: where this viewer sits in the trees that carry it."""

    def __init__(self, channel: str, address: str, upload_kbps: int, coords: tuple[float, ...] = (),
                 resume: Resume | None = None) -> None:
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "upload_kbps", upload_kbps)
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "resume", resume)


@dataclass(frozen=True, slots=True)
class Resume:
    """A rejoining viewer's place in the trees it still plays from: the id it had, the
    sub-stream it relays (`NO_PEER`: none) and its parent in each sub-stream (id `NO_PEER`:
    none). A restarted tracker rebuilds those trees from these instead of moving everyone."""

    node_id: int
    home: int
    parents: tuple[PeerRef, ...]
    proof: Token | None = None
    """A token the former tracker gave this node (its seed's, or a backup's): it proves the id."""
    children: int = 0
    """Children it feeds now, over all sub-streams: the tracker keeps that many of its slots for
    them while they come back, rather than fill them with others it would then refuse."""

    def __init__(self, node_id: int, home: int, parents: tuple[PeerRef, ...],
                 proof: Token | None = None, children: int = 0) -> None:
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "proof", proof)
        object.__setattr__(self, "children", children)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The tracker admits a node to a channel."""

    node_id: int
    channel: str
    public_key: bytes
    """Channel key: peers verify chunks with it (and may pin it on their command line)."""
    tracker_key: bytes
    """Tracker's key: parents verify tokens with it."""
    substreams: int
    chunk_ms: int
    bitrate_kbps: int
    mode: str = "tree"
    """"tree": push trees plus pull repair; "mesh": pull only, driven by have-maps."""
    seed_id: int = NO_PEER
    """The channel's seed (the source of last resort)."""

    def __init__(self, node_id: int, channel: str, public_key: bytes, tracker_key: bytes,
                 substreams: int, chunk_ms: int, bitrate_kbps: int, mode: str = "tree",
                 seed_id: int = NO_PEER) -> None:
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "tracker_key", tracker_key)
        object.__setattr__(self, "substreams", substreams)
        object.__setattr__(self, "chunk_ms", chunk_ms)
        object.__setattr__(self, "bitrate_kbps", bitrate_kbps)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "seed_id", seed_id)


@dataclass(frozen=True, slots=True)
class Assign:
    """Use `parent` for sub-stream `substream`, with `backup` ready if it fails. Without a
    parent `token`, a renewal: the parent is unchanged (a subscribed child no longer needs its
    token), take the fresh backup token; one naming another parent than ours is stale."""

    substream: int
    parent: PeerRef
    token: Token | None
    backup: PeerRef | None = None
    backup_token: Token | None = None
    relays: bool = False
    """This sub-stream is the receiver's home tree: it will relay it (tell the parent so)."""

    def __init__(self, substream: int, parent: PeerRef, token: Token | None,
                 backup: PeerRef | None = None, backup_token: Token | None = None,
                 relays: bool = False) -> None:
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "parent", parent)
        object.__setattr__(self, "token", token)
        object.__setattr__(self, "backup", backup)
        object.__setattr__(self, "backup_token", backup_token)
        object.__setattr__(self, "relays", relays)


@dataclass(frozen=True, slots=True)
class Neighbours:
    """Mesh neighbours for have-maps and pull repair, each with a pull-only token; among them
    the channel's seed, `seed_id` (a restarted seed is a new node: its viewers learn it here)."""

    peers: tuple[PeerRef, ...]
    tokens: tuple[Token, ...]
    seed_id: int

    def __init__(self, peers: tuple[PeerRef, ...], tokens: tuple[Token, ...], seed_id: int) -> None:
        object.__setattr__(self, "peers", peers)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "seed_id", seed_id)


@dataclass(frozen=True, slots=True)
class Reject:
    """The tracker cannot admit this node (its channel did not go live, no capacity left, evicted)."""

    reason: str

    def __init__(self, reason: str) -> None:
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class Waiting:
    """Tracker → viewer: the channel is not live (not announced yet, or its seed is reconnecting).
    The `Join` is held, not refused: the viewer is placed the moment the seed announces it, or
    rejected if that takes longer than the tracker holds joins."""

    reason: str

    def __init__(self, reason: str) -> None:
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class Leave:
    """Graceful departure."""

    reason: str = ""

    def __init__(self, reason: str = "") -> None:
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class ParentLost:
    """A peer lost its parent for a sub-stream; `switched_to` is the backup it now uses or -1."""

    substream: int
    parent: int
    switched_to: int = NO_PEER

    def __init__(self, substream: int, parent: int, switched_to: int = NO_PEER) -> None:
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "parent", parent)
        object.__setattr__(self, "switched_to", switched_to)


@dataclass(frozen=True, slots=True)
class Complaint:
    """A node reports misbehaviour: forged data, or a child too slow to keep up."""

    offender: int
    reason: str
    kind: str = "forged"
    """"forged" or "slow"."""

    def __init__(self, offender: int, reason: str, kind: str = "forged") -> None:
        object.__setattr__(self, "offender", offender)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "kind", kind)


@dataclass(frozen=True, slots=True)
class Revoke:
    """Tracker → everyone an evicted node holds a token for (its parents, backups and pull
    sources, and those it was moved away from): stop serving `node_id` now, and take no token
    of its until `until` (when the last one it holds expires).
    An evicted node that ignores its `Reject` would otherwise go on taking upload that the
    tracker has given to someone else."""

    node_id: int
    until: float
    reason: str

    def __init__(self, node_id: int, until: float, reason: str) -> None:
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(self, "until", until)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class Detach:
    """Tracker → a parent or backup it moved `node_id` away from, in sub-stream `substream`:
    the token `node_id` holds for you there is spent. After a grace period (an honest child
    unsubscribes as soon as it has its new parent), drop its subscription if it still has one,
    and take no token of its for that sub-stream that expires before `until` (every one issued
    before the move; one issued at the move, for a new place, expires at `until`). A child that
    stayed would keep a slot the tracker counts as free until its token expired."""

    node_id: int
    substream: int
    until: float

    def __init__(self, node_id: int, substream: int, until: float) -> None:
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "until", until)


# -- node ↔ node ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a link: who is calling, and the token that allows it."""

    node_id: int
    channel: str
    token: Token | None = None

    def __init__(self, node_id: int, channel: str, token: Token | None = None) -> None:
        object.__setattr__(self, "node_id", node_id)
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "token", token)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Push me sub-stream `substream` from `from_seq` on (-1: from the next chunk)."""

    substream: int
    token: Token
    from_seq: int = -1
    relays: bool = False
    """The subscriber relays this sub-stream further: it is sent to first (shallow, low latency)."""

    def __init__(self, substream: int, token: Token, from_seq: int = -1,
                 relays: bool = False) -> None:
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "token", token)
        object.__setattr__(self, "from_seq", from_seq)
        object.__setattr__(self, "relays", relays)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    substream: int

    def __init__(self, substream: int) -> None:
        object.__setattr__(self, "substream", substream)


@dataclass(frozen=True, slots=True)
class Refuse:
    """A parent will not serve this sub-stream (full, bad token)."""

    substream: int
    reason: str

    def __init__(self, substream: int, reason: str) -> None:
        object.__setattr__(self, "substream", substream)
        object.__setattr__(self, "reason", reason)


@dataclass(frozen=True, slots=True)
class Have:
    """Have-map: bit i of `bitmap` (LSB first) says the sender holds chunk `base + i`."""

    base: int
    bitmap: bytes

    def __init__(self, base: int, bitmap: bytes) -> None:
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "bitmap", bitmap)


@dataclass(frozen=True, slots=True)
class Request:
    """Pull: send me these chunks (each on its own stream)."""

    seqs: tuple[int, ...]

    def __init__(self, seqs: tuple[int, ...]) -> None:
        object.__setattr__(self, "seqs", seqs)


@dataclass(frozen=True, slots=True)
class Missing:
    """Answer to `Request` for chunks the sender does not hold."""

    seqs: tuple[int, ...]

    def __init__(self, seqs: tuple[int, ...]) -> None:
        object.__setattr__(self, "seqs", seqs)


@dataclass(frozen=True, slots=True)
class ChunkHead:
    """Opens a chunk stream; `size` payload bytes follow."""

    channel: str
    seq: int
    size: int
    flags: int
    """Bit 0: the chunk starts with a random-access point."""
    ts: float
    """Seed clock when the chunk was complete at the seed (latency reference)."""
    sig: bytes = field(repr=False)
    """Channel key's Ed25519 signature (see `meshcast.chunk`)."""

    @property
    def rap(self) -> bool:
        return bool(self.flags & FLAG_RAP)

    def __init__(self, channel: str, seq: int, size: int, flags: int, ts: float,
                 sig: bytes) -> None:
        object.__setattr__(self, "channel", channel)
        object.__setattr__(self, "seq", seq)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "ts", ts)
        object.__setattr__(self, "sig", sig)


FLAG_RAP: Final = 1

Message = (
    Announce | Join | Welcome | Assign | Neighbours | Reject | Waiting | Leave | ParentLost | Complaint
    | Revoke | Detach | Hello | Subscribe | Unsubscribe | Refuse | Have | Request | Missing | ChunkHead
)
