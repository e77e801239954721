"""CLI subcommands: each module has ``main(argv=None) -> int`` and imports its heavy dependencies inside."""
