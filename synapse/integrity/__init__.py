"""Proving replicas identical and repairing the one that is not: checkpoints, self-repair, rollback, catch-up by diff, audit (see DESIGN.md)."""
