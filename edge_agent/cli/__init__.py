"""The command line: `edge-agent` and its subcommands, their terminal output, the demo."""

from edge_agent.cli.main import main

__all__ = ["main"]
