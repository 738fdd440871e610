"""The seed: where a broadcaster's stream enters meshcast.

- `node.SeedNode`: sans-IO: numbers, signs and pushes chunks; last-resort source for pulls.
- `ingest`: container-aware MPEG-TS chunker (`TsChunker`) and inputs (file, stdin, UDP).
"""
