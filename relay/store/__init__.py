"""Stores: the durable queue behind every 250, as the `Store` protocol and its implementations."""
