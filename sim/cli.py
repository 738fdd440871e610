"""`meshcast sim run|compare`: command-line front end of the simulator (filled in by the sim driver work)."""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the `sim` command and its `run` / `compare` sub-commands to the meshcast CLI."""
    parser = subparsers.add_parser("sim", help="run the discrete-event simulator")
    parser.set_defaults(func=lambda args: parser.error("choose 'run' or 'compare'"))
