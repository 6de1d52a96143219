"""Command-line interface: `alignguard <subcommand>`; see `alignguard --help`."""
