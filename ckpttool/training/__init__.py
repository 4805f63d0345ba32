"""Helpers for training scripts: load without device surprises, fix keys, save safely."""
