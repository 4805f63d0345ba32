"""Hostile-input corpus for ckpttool and the CLI contract tests run against it."""
