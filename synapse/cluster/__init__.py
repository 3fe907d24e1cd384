"""The Raft group: the PySyncObj bridge, the dump file and group commit (see DESIGN.md)."""
