"""The discrete-event simulator: the real tracker, seed and peer nodes on a virtual clock.

- `driver.Simulation` / `driver.run_scenario`: the driver (one timeline, seeded).
- `scheduler`, `network` (latency models incl. RIPE Atlas, FIFO cut-through uplinks, loss),
  `workload` (arrivals, sessions, capacity classes), `scenario` (TOML), `metrics`
  (latency, continuity, offload, startup, depth; JSON/CSV/PNG), `progress`, `cli`.
"""
