"""Small pure rules both the tracker and the nodes apply, so they never disagree.

`child_slots`: how many (child, sub-stream) pairs a node's upload carries. One slot is one
sub-stream (bitrate/K) to one child; `HEADROOM` keeps 20% of the upload for control traffic,
pull repair and bursts — Justin.tv's rule: never give a parent more than its upload carries.
A channel that runs out of slots is stretched to `STRETCH_HEADROOM` before anyone is refused.
"""

from __future__ import annotations

from typing import Final

HEADROOM: Final = 0.8
STRETCH_HEADROOM: Final = 0.95
"""Share of upload a parent may be given once its channel has no free slot left at `HEADROOM`:
less spare for repair beats turning viewers away, and it still never oversubscribes.

It holds because nothing else may queue ahead of the pushes: pull answers and catch-ups use only
spare upload (`PULL_BACKLOG_S`). Simulated, one 9,000-viewer channel (Justin.tv-like capacity
mix, 40 % NATed, lognormal sessions), 90 s: at 0.8, 99.88 % continuity with 6,793 viewers
refused; at 0.9, 99.68 % with 5,472; at 0.95, 99.18 % with 2,996 (89.95 % while catch-ups
were pushes)."""


def child_slots(upload_kbps: float, bitrate_kbps: float, substreams: int,
                headroom: float = HEADROOM) -> int:
    if bitrate_kbps <= 0 or upload_kbps <= 0:
        return 0
    return int(upload_kbps * headroom * substreams // bitrate_kbps)


MAX_BACKLOG_S: Final = 2.0
"""A chunk that would wait longer than this in a sender's queue is dropped for that child:
it would arrive too late to play, and queueing it only delays the chunks behind it."""


PULL_BACKLOG_S: Final = 0.1
"""Pulls are answered only from spare upload: one that would wait longer than this is
refused (the puller asks elsewhere), so repair traffic never starves the push trees."""


def drop_chunk(backlog_s: float, push: bool) -> bool:
    """Should a sender whose queue holds `backlog_s` seconds of upload skip this chunk?"""
    return backlog_s > (MAX_BACKLOG_S if push else PULL_BACKLOG_S)


LINK_IDLE_TIMEOUT_S: Final = 3.0
"""A link that heard nothing from its remote for this long is closed (QUIC idle time-out; each
side sends a keep-alive PING when quiet for a third of it, ahead of any queued chunk data; a
tracker's links send heartbeats instead: `QUIET_LINK_IDLE_S`).

It is how fast a vanished (kill -9) peer is noticed — by its children and by the tracker, which
only then re-homes the subtree and stops handing the dead peer out as a backup. Simulated on the
churn scenario (2k viewers, 80 % abrupt departures): continuity 98.8 % at 15 s, 99.87 % at 3 s
(99.93 % at 2 s)."""


def keepalive_s(idle_timeout: float) -> float:
    """How long a link may be quiet before its keep-alive: a third of its idle time-out, so one
    lost keep-alive still leaves room for another before the time-out."""
    return idle_timeout / 3


QUIET_LINK_IDLE_S: Final = 600.0
"""The QUIC idle time-out of a tracker's links, which stay alive by heartbeats instead.

A tracker holds a link per viewer, and most say nothing for minutes. With QUIC keep-alives (a PING
from each end after a third of the idle time-out), a real tracker process spent ~400 µs of CPU a
second per quiet link (`bench/tracker_idle.py`: 40 % of a core for 1,000 viewers; 10k would have
needed four cores). A heartbeat is one tiny datagram outside QUIC, sent every second by the client
and echoed (`meshcast.net.quic`, "Heartbeats"): 10,000 quiet links took 14.7 % of a core (15 µs
each a second), 1,000 took 5.5 %. Either end still closes the link after `LINK_IDLE_TIMEOUT_S`
without hearing the other, so a vanished viewer is noticed as fast as before: a tracker that took
30 s to notice (QUIC keep-alives every 10 s) let the churn scenario (2k viewers) fall from 99.73 %
to 89.6 % continuity, newcomers placed below viewers long gone.

The tracker offers this; a client offers it to every server and QUIC takes the smaller offer,
so links to peers and seeds keep `LINK_IDLE_TIMEOUT_S`. Long, so QUIC's own PINGs are rare."""


def handoff_slack(slots: int) -> int:
    """Extra children a parent accepts beyond its slots, briefly, while the tracker moves them.

    The tracker counts slots exactly, but its messages race: a newcomer's `Subscribe` can
    reach a parent before the `Unsubscribe` of the child the tracker moved away to make room.
    A valid token is the tracker's word that the slot exists; the slack only absorbs the race,
    and still bounds what a faulty tracker could make a parent carry.
    """
    return max(2, slots // 4)


def substream_of(seq: int, substreams: int) -> int:
    """Chunk `seq` belongs to sub-stream `seq mod K` (SplitStream striping)."""
    return seq % substreams
