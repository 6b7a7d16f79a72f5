"""Command line: `smtp-graph-relay SUBCOMMAND` (DESIGN §4); `main(argv) -> int`, never sys.exit."""
