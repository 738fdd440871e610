"""In-process wiring of sans-IO nodes for logic tests (h11's ConnectionPair, grown to a swarm).

Every control message goes through the real wire codec; links deliver instantly and in order;
time is whatever the test says. `tamper` lets a test corrupt the bytes one node relays.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from meshcast import effects as fx
from meshcast import wire
from meshcast.policy import drop_chunk


class Wiring:
    def __init__(self, *, whole: bool = False) -> None:
        """`whole`: a receiver gets each `SendChunk` in one `chunk_received` call, as in the
        simulator (by default, as a stream of head, bytes and end, as from the runtime)."""
        self.whole = whole
        self.now = 0.0
        self.nodes: dict[str, Any] = {}
        self.peer_of: dict[int, tuple[Any, int]] = {}
        self.owner: dict[int, Any] = {}
        self._next = 1
        self.delivered: dict[Any, list[fx.Deliver]] = defaultdict(list)
        self.skipped: dict[Any, list[int]] = defaultdict(list)
        self.notices: list[str] = []
        self.closed: list[tuple[Any, str]] = []
        self.tamper: dict[Any, Callable[[bytes], bytes]] = {}
        self.dead: set[Any] = set()
        self.backlog: dict[Any, float] = {}
        """Seconds of upload a node has queued, as the drivers estimate it: a `SendChunk` is
        dropped by their rule (`drop_chunk`) and the sender told, as they do."""
        self.dropped: list[tuple[Any, int, bool]] = []
        self.chunk_sends: list[tuple[Any, fx.SendChunk]] = []
        """Every `SendChunk` a node emitted, with the node, in order."""
        self.deaf: dict[Any, tuple[type, ...]] = {}
        """Node → message types it ignores (a misbehaving node: say, one that takes no `Reject`)."""
        self._queue: deque[tuple[Any, fx.Effect]] = deque()

    def add(self, address: str, node: Any) -> Any:
        self.nodes[address] = node
        return node

    def start(self, node: Any) -> None:
        node.start(now=self.now)
        self.run()

    # -- pumping ---------------------------------------------------------------------------

    def run(self, limit: int = 1_000_000) -> None:
        """Process effects until every node is quiet."""
        for _ in range(limit):
            for node in list(self.nodes.values()):
                if node not in self.dead:
                    for eff in node.drain():
                        self._queue.append((node, eff))
            if not self._queue:
                return
            while self._queue:
                self._apply(*self._queue.popleft())
        raise AssertionError("effects did not settle")

    def advance(self, until: float, step: float | None = None) -> None:
        """Move time forward to `until`, firing timers in order."""
        while True:
            due = [(t, n) for n in self.nodes.values() if n not in self.dead
                   for t in [n.next_timer()] if t is not None and t <= until]
            if not due:
                break
            t, node = min(due, key=lambda x: x[0])
            self.now = max(self.now, t)
            node.handle_timer(now=self.now)
            self.run()
        self.now = until

    def kill(self, node: Any) -> None:
        """Abrupt death (kill -9): every link of the node closes on the other side."""
        self.dead.add(node)
        node.drain()
        for link, (peer, plink) in list(self.peer_of.items()):
            if self.owner.get(link) is node:
                del self.peer_of[link]
                self.peer_of.pop(plink, None)
                peer.link_closed(plink, now=self.now, reason="connection lost")
        self.run()

    def _apply(self, node: Any, eff: fx.Effect) -> None:
        now = self.now
        t = type(eff)
        if t is fx.Open:
            target = self.nodes.get(eff.address)
            if target is None or target in self.dead:
                node.open_failed(eff.ref, now=now, reason="no such node")
                return
            a, b = self._next, self._next + 1
            self._next += 2
            self.peer_of[a], self.peer_of[b] = (target, b), (node, a)
            self.owner[a], self.owner[b] = node, target
            target.link_opened(b, now=now)
            node.link_opened(a, now=now, ref=eff.ref)
            return
        if t in (fx.Deliver,):
            self.delivered[node].append(eff)
            return
        if t is fx.Skip:
            self.skipped[node].append(eff.seq)
            return
        if t is fx.Notice:
            self.notices.append(eff.text)
            return
        if t is fx.SendChunk:
            self.chunk_sends.append((node, eff))
            for link in eff.links:
                self._send_whole(node, link, eff)
            return
        pair = self.peer_of.get(eff.link)
        if pair is None:
            return
        peer, plink = pair
        if peer in self.dead:
            return
        if t is fx.Send:
            if isinstance(eff.msg, self.deaf.get(peer, ())):
                return
            peer.handle(plink, wire.decode(wire.encode(eff.msg)), now=now)
        elif t is fx.Close:
            del self.peer_of[eff.link]
            self.peer_of.pop(plink, None)
            self.closed.append((node, eff.reason))
            peer.link_closed(plink, now=now, reason=eff.reason)
        elif t is fx.ChunkBegin:
            peer.chunk_begin(plink, wire.decode(wire.encode(eff.head)), now=now)
        elif t is fx.ChunkBytes:
            data = self.tamper[node](eff.data) if node in self.tamper else eff.data
            peer.chunk_data(plink, eff.seq, data, now=now)
        elif t is fx.ChunkEnd:
            peer.chunk_end(plink, eff.seq, now=now, aborted=not eff.ok)

    def _send_whole(self, node: Any, link: int, eff: fx.SendChunk) -> None:
        """One target of a `SendChunk`: a receiver sees a stream, however the sender queued it."""
        now = self.now
        pair = self.peer_of.get(link)
        if pair is None:
            return
        peer, plink = pair
        if peer in self.dead:
            return
        head, payload = eff.chunk
        seq = head.seq
        if drop_chunk(self.backlog.get(node, 0.0), eff.push):
            self.dropped.append((node, seq, eff.push))
            node.chunk_dropped(link, seq, now=now, push=eff.push)
            return
        data = self.tamper[node](payload) if node in self.tamper else payload
        if self.whole:
            peer.chunk_received(plink, fx.Chunk(head, data), now=now, aborted=not eff.ok)
            return
        peer.chunk_begin(plink, wire.decode(wire.encode(head)), now=now)
        peer.chunk_data(plink, seq, data, now=now)
        peer.chunk_end(plink, seq, now=now, aborted=not eff.ok)
