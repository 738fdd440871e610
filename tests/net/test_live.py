"""The live path over real QUIC on 127.0.0.1, in one process, on asyncio and on trio.

A tracker, a seed replaying an ffmpeg-made MPEG-TS file in real time and a handful of peers
writing what they play to files (two of them started before the seed: the tracker holds their
joins until the channel is live). Every player's file must be the seed's input byte for byte from
its first random-access chunk to the end, and decode cleanly. A relay that corrupts what it
forwards (an adversary at the transport boundary: a `NodeRunner` that flips bytes on the way
out) is caught by its children, evicted by the tracker, and nothing it forged reaches a player.
A malformed control frame from a stranger closes that one link with the protocol error.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import pytest

from meshcast import effects as fx
from meshcast.crypto import Crypto
from meshcast.net.quic import LinkClosed, open_endpoint
from meshcast.policy import QUIET_LINK_IDLE_S
from meshcast.runtime import NodeRunner, parse_address
from meshcast.service import PeerHandle, SeedHandle, TrackerHandle, run_peer, run_seed, run_tracker
from peer.node import PeerNode
from tests.media import Chunks, assert_faithful, decode_errors, runs, synthetic_ts

pytestmark = [pytest.mark.anyio, pytest.mark.net]

CHANNEL = "live"
BITRATE_KBPS = 600  # declared; the test card is ~250 kbit/s


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Chunks]:
    path = synthetic_ts(tmp_path_factory.mktemp("live") / "input.ts", seconds=8)
    return path, Chunks(path.read_bytes())


class Swarm:
    def __init__(self, tg: anyio.abc.TaskGroup, tracker: TrackerHandle, seed: SeedHandle,
                 tmp: Path) -> None:
        self.tg, self.tracker, self.seed, self.tmp = tg, tracker, seed, tmp
        self.peers: list[PeerHandle] = []
        self.outputs: list[Path] = []

    async def add_peer(self, upload_kbps: int = 2000) -> PeerHandle:
        out = self.tmp / f"peer{len(self.peers)}.ts"
        peer = await self.tg.start(partial(run_peer, tracker=self.tracker.address, channel=CHANNEL,
                                           output=str(out), upload_kbps=upload_kbps))
        self.peers.append(peer)
        self.outputs.append(out)
        return peer

    async def played_to_the_end(self, peers: list[PeerHandle]) -> int:
        """Wait for the input to end and `peers` to play (and write) its last chunk."""
        await self.seed.finished.wait()
        last = self.seed.node.next_seq - 1
        pending = {id(p) for p in peers}
        try:
            while pending:
                for p, out in zip(self.peers, self.outputs):
                    if (id(p) in pending and p.last_seq == last
                            and out.exists() and os.path.getsize(out) == p.player.bytes):
                        pending.discard(id(p))
                await anyio.sleep(0.05)
        finally:  # (a time-out: say who is stuck where, for the failure's report)
            for p in peers:
                if id(p) in pending:
                    print(f"stuck: {stuck_at(p.node, last)}; last played {p.last_seq}")
        return last


@asynccontextmanager
async def swarm(tmp_path: Path, source: Path, *, seed_kbps: int, early: int = 0) -> AsyncIterator[Swarm]:
    """A tracker and a seed; `early` peers join before the seed starts (their joins are held)."""
    async with anyio.create_task_group() as tg:
        tracker = await tg.start(partial(run_tracker, seed=1))
        sw = Swarm(tg, tracker, None, tmp_path)  # type: ignore[arg-type]
        for _ in range(early):
            await sw.add_peer()
        while len(tracker.node.waiting.get(CHANNEL, ())) < early:  # (bounded by the caller)
            await anyio.sleep(0.01)
        sw.seed = await tg.start(partial(run_seed, tracker=tracker.address, channel=CHANNEL,
                                         input=str(source), key=str(tmp_path / "key.pem"),
                                         realtime=True, upload_kbps=seed_kbps,
                                         bitrate_kbps=BITRATE_KBPS))
        yield sw
        tg.cancel_scope.cancel()


async def malformed_frame_closes(address: str) -> str:
    """Open a link to `address`, send a malformed control frame; the reason it is closed."""
    async with open_endpoint() as ep:
        host, port = address.rsplit(":", 1)
        link = await ep.connect(host, int(port))
        link.send_control(b"\x00\x00\x00\x03\x93\x01\x63")  # [1, 99]: a truncated message
        event = await link.receive()
        while not isinstance(event, LinkClosed):
            event = await link.receive()
    return event.reason


def stuck_at(node: PeerNode, last: int) -> str:
    """What a viewer that has not played chunk `last` holds and waits for."""
    subs = node.subs
    return (f"peer {node.id}: play_next {node.play_next}, newest {node.newest} of {last}, "
            f"gaps {list(node.gaps)}, requested {sorted(node.requested)}, "
            f"sub-streams (parent, newest) {[(subs[5 * k], subs[5 * k + 1]) for k in range(node.substreams)]}, "
            f"tracker link {node.tracker_link}, links {len(node.conns)}")


def report(peers: list[PeerHandle]) -> None:
    for p in peers:
        s = p.summary()
        print(f"peer {s['id']}: p50 latency {s['latency_ms_p50']} ms, startup {s['startup_ms']} ms, "
              f"max stall {s['max_stall_ms']} ms, children {s['children']}, "
              f"from peers {s['bytes_from_peers']} B, from seed {s['bytes_from_seed']} B")


async def test_every_player_gets_the_input_byte_for_byte(tmp_path: Path, media) -> None:
    source, chunks = media
    with anyio.fail_after(40):
        # Two viewers come before the broadcast; ~2 copies from the seed: peers relay the rest.
        async with swarm(tmp_path, source, seed_kbps=1500, early=2) as sw:
            for _ in range(4):
                await sw.add_peer()
            # A stranger's malformed control frame closes its own link, nothing else.
            reason = await malformed_frame_closes(sw.peers[2].address)
            assert reason.startswith("protocol error: undecodable message"), reason
            await sw.played_to_the_end(sw.peers)
            report(sw.peers)
            peers = sw.peers
    assert sum(p.node.bytes_from_peers for p in peers) > 0  # trees are deeper than the seed
    for p, out in zip(peers, sw.outputs):
        assert p.node.skipped == 0 and p.node.forged == 0
        assert_faithful(out.read_bytes(), chunks, tail_s=0)
        assert decode_errors(out) == ""


class ForgingRunner(NodeRunner):
    """A relay gone bad: flips the first byte of every piece of chunk data it sends."""

    def _apply(self, eff: fx.Effect, dropped):
        if type(eff) is fx.ChunkBytes and eff.data:
            eff = replace(eff, data=bytes([eff.data[0] ^ 0xFF]) + eff.data[1:])
        elif type(eff) is fx.SendChunk and eff.chunk.payload:
            head, payload = eff.chunk
            eff = replace(eff, chunk=fx.Chunk(head, bytes([payload[0] ^ 0xFF]) + payload[1:]))
        super()._apply(eff, dropped)


async def run_forger(*, tracker: str, upload_kbps: int,
                     task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
    async with open_endpoint(upload_bps=upload_kbps * 1000) as ep:
        node = PeerNode(channel=CHANNEL, crypto=Crypto(), rng=random.Random(7), tracker=tracker,
                        address=f"127.0.0.1:{ep.local_address[1]}", upload_kbps=upload_kbps)
        async with anyio.create_task_group() as tg:
            await tg.start(ForgingRunner(node, ep).run)
            task_status.started(node)


async def test_forging_relay_is_evicted_and_nothing_forged_is_played(tmp_path: Path, media) -> None:
    source, chunks = media
    with anyio.fail_after(40):
        async with swarm(tmp_path, source, seed_kbps=1500) as sw:
            # First and biggest: the tracker makes it a relay near the root.
            bad = await sw.tg.start(partial(run_forger, tracker=sw.tracker.address,
                                            upload_kbps=8000))
            for _ in range(5):
                await sw.add_peer()
            await sw.played_to_the_end(sw.peers)
            report(sw.peers)
            tracker = sw.tracker.node
            peers = sw.peers
    print(f"forged chunks caught: {[p.node.forged for p in peers]}; evictions {tracker.evictions}")
    assert sum(p.node.forged for p in peers) > 0, "no child ever received from the forger"
    assert tracker.evictions >= 1
    assert bad.rejected.startswith("evicted"), bad.rejected
    for p, out in zip(peers, sw.outputs):
        assert p.node.rejected == ""
        found = runs(out.read_bytes(), chunks)  # any corrupt byte fails here
        assert len(found) <= p.node.skipped + 1
        assert sum(length for _, length in found) == p.player.bytes


async def test_a_restarted_seed_carries_the_channel_on(tmp_path: Path, media) -> None:
    """The broadcaster's seed stops and a new one starts with the same key: its viewers play
    on from its chunks (numbered from the wall clock, so later than the old seed's) without
    rejoining, and the tracker places them under it."""
    source, _ = media
    key = str(tmp_path / "key.pem")
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tracker = await tg.start(partial(run_tracker, seed=1))
            sw = Swarm(tg, tracker, None, tmp_path)  # type: ignore[arg-type]
            seed_kw = dict(tracker=tracker.address, channel=CHANNEL, input=str(source), key=key,
                           realtime=True, upload_kbps=1500, bitrate_kbps=BITRATE_KBPS)
            async with anyio.create_task_group() as first:
                old = await first.start(partial(run_seed, **seed_kw))
                for _ in range(4):
                    await sw.add_peer()
                while min(p.node.delivered for p in sw.peers) < 10:
                    await anyio.sleep(0.05)
                first.cancel_scope.cancel()  # its endpoint closes: every link to it drops
            old_last = old.node.next_seq - 1
            played_before = [p.node.delivered for p in sw.peers]
            new = await tg.start(partial(run_seed, **seed_kw))
            while not all(p.last_seq is not None and p.last_seq >= new.node.next_seq - 2 >= old_last + 10
                          for p in sw.peers):
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    report(sw.peers)
    assert new.node.id != old.node.id and new.public_key == old.public_key
    print(f"old seed: {old.node.chunks_sent} chunks up to seq {old_last}; new seed: "
          f"{new.node.chunks_sent} from seq {new.node.next_seq - new.node.chunks_sent}; played "
          f"since: {[p.node.delivered - b for p, b in zip(sw.peers, played_before)]}")
    for p, before in zip(sw.peers, played_before):
        assert p.node.rejected == "" and p.node.forged == 0
        assert p.node.delivered - before >= new.node.chunks_sent - 3  # all but the first few
        assert p.node.seed_id == new.node.id


@pytest.mark.parametrize("kept_key", [False, True], ids=["new key", "kept key"])
async def test_viewers_play_through_a_tracker_restart(tmp_path: Path, media, kept_key: bool) -> None:
    """The tracker process stops and a new one starts on the same address, with a new key or
    the one it keeps in a file (`--key`): the trees carry the stream meanwhile, then the seed
    and every viewer come back to the new tracker, which adopts the trees they come back with,
    without a viewer ever stopping."""
    source, _ = media
    tracker_key = str(tmp_path / "tracker.pem") if kept_key else None
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as first:
                old = await first.start(partial(run_tracker, seed=1, key=tracker_key))
                sw = Swarm(tg, old, None, tmp_path)  # type: ignore[arg-type]
                sw.seed = await tg.start(partial(
                    run_seed, tracker=old.address, channel=CHANNEL, input=str(source),
                    key=str(tmp_path / "key.pem"), realtime=True, upload_kbps=1500,
                    bitrate_kbps=BITRATE_KBPS))
                for _ in range(4):
                    await sw.add_peer()
                while min(p.node.delivered for p in sw.peers) < 5:
                    await anyio.sleep(0.05)
                ids = [sw.seed.node.id] + [p.node.id for p in sw.peers]
                first.cancel_scope.cancel()  # the tracker's endpoint closes: its links drop
            new = await tg.start(partial(run_tracker, old.address, seed=2, key=tracker_key))
            key = new.node.key.public
            while not (sw.seed.node.tracker_key == key and CHANNEL in new.node.channels
                       and all(p.node.tracker_key == key and p.node.id in
                               new.node.channels[CHANNEL].forest.members
                               for p in [sw.seed, *sw.peers])):
                await anyio.sleep(0.05)
            rejoined = [p.node.delivered for p in sw.peers]
            last = await sw.played_to_the_end(sw.peers)
            tg.cancel_scope.cancel()
    report(sw.peers)
    assert (key == old.node.key.public) == kept_key
    assert new.node._id_base != old.node._id_base  # (its ids never clash with its old self's)
    # The new tracker adopted the trees: every node kept its id.
    assert [sw.seed.node.id] + [p.node.id for p in sw.peers] == ids
    for p, at_rejoin in zip(sw.peers, rejoined):
        assert p.node.rejected == "" and p.last_seq == last
        assert p.node.delivered > at_rejoin  # played on under the new tracker
        assert p.max_stall < 3.0  # never stopped for long: the trees carried the stream


async def test_a_tracker_keeps_its_links_alive_by_heartbeats_not_quic_keepalives() -> None:
    # What `meshcast tracker` serves on: links with QUIC's long idle time-out, kept by heartbeats
    # (`meshcast.net.quic`, "Heartbeats"); a quiet viewer costs it ~15 µs a second, not ~400.
    async with anyio.create_task_group() as tg:
        tracker = await tg.start(partial(run_tracker, seed=1))
        async with open_endpoint() as ep:
            with anyio.fail_after(10):
                link = await ep.connect(*parse_address(tracker.address))
            assert link.idle_timeout == QUIET_LINK_IDLE_S
        tg.cancel_scope.cancel()
