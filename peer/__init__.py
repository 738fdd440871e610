"""The viewer peer.

- `node.PeerNode`: sans-IO receive, verify, cut-through relay, pull repair, backup switch,
  in-order playback with deadlines.
- `player.PlayerOutput`: hands the verified stream to real players (HTTP, file, stdout).
"""
