"""Mutation fuzzing of the ckpttool reader (hypothesis tests and a standalone runner)."""
