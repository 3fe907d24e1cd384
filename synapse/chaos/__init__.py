"""Chaos testing: histories of client operations and the checkers that judge them (see DESIGN.md)."""
