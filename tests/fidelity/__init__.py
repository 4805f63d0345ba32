"""Differential tests against torch: ``torch.load`` of what ckpttool writes equals ``torch.load``
of its input, object for object (see ``compare.py``), over a generated zoo (``zoo.py``)."""
