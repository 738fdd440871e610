"""Transports the runtime driver moves bytes over: `quic` (aioquic over anyio, asyncio and trio),
and `admission`, the per-address limit on new inbound connections that an endpoint applies."""
