"""The embedded default store: one directory tree on the local file system (DESIGN §6)."""
