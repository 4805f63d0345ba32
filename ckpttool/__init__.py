"""ckpttool: inspect, fix and convert PyTorch checkpoints without running their code."""

__version__ = "0.1.0"
