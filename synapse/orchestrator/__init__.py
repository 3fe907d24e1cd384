"""The scheduler: places tasks on execution nodes and watches their health (DESIGN.md)."""
