"""Transports the runtime driver moves bytes over: `quic` (aioquic over anyio, asyncio and trio)."""
