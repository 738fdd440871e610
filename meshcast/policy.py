"""Small pure rules both the tracker and the nodes apply, so they never disagree.

`child_slots`: how many (child, sub-stream) pairs a node's upload carries. One slot is one
sub-stream (bitrate/K) to one child; `HEADROOM` keeps 10% of the upload for control traffic,
pull repair and bursts — Justin.tv's rule: never give a parent more than its upload carries.
"""

from __future__ import annotations

HEADROOM = 0.9


def child_slots(upload_kbps: float, bitrate_kbps: float, substreams: int) -> int:
    if bitrate_kbps <= 0 or upload_kbps <= 0:
        return 0
    return int(upload_kbps * HEADROOM * substreams // bitrate_kbps)


def substream_of(seq: int, substreams: int) -> int:
    """Chunk `seq` belongs to sub-stream `seq mod K` (SplitStream striping)."""
    return seq % substreams
