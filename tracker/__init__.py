"""The tracker ("Usher"): owns each channel's push trees.

- `node.TrackerNode`: sans-IO admission, placement, repair, eviction, token issuing.
- `forest.Forest`: the per-channel K sub-stream trees with capacity indexes.
- `placement`: pluggable strategies — `tree` (ours), `random` and `mesh` baselines.
"""
