"""Commands, their encoding and the pure, deterministic command processor (see DESIGN.md)."""
