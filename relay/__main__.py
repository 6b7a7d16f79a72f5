"""`python -m relay` is the same program as the `smtp-graph-relay` console script."""

from relay.cli.main import entry_point

entry_point()
