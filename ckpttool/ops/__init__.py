"""The commands as library operations: one module per command, built from shared steps."""
