"""The synapse command line."""
