"""meshcast: peer-assisted live video distribution at interactive latency.

This shared package holds what the tracker, seed and peer have in common:

- `messages` (every message, frozen dataclasses) and `wire` (msgpack codec, strict validation);
- `crypto` (Ed25519 chunk signatures, tracker tokens; `SimCrypto` for the simulator);
- `effects` (what nodes ask their driver to do), `node` (`NodeBase`, `RelayNode`: the parent
  side shared by seed and peers), `policy` (capacity and back-pressure rules both drivers apply);
- `errors` (`LocalProtocolError`, `RemoteProtocolError`);
- the network driver: `runtime` (`NodeRunner`), `net.quic` (QUIC transport over anyio),
  `service` (tracker/seed/peer services) and `cli` (the `meshcast` command).

The simulator (`sim`) is the other driver of the same nodes.
"""

__version__ = "0.1.0"
