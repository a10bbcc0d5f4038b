"""CLI subcommands: every module here defines register(subparsers)."""
