"""What a writer leaves out of its output, and why, as data: the command line words it."""

from __future__ import annotations

from dataclasses import dataclass

# why an entry of the input is not in the output (``LeftOut.reason``)
NONE_ENTRY = "none"  # a None where a tensor could be
RESERVED_KEY = "reserved_key"  # a scalar whose name is a metadata key ckpttool sets itself
OUTSIDE_STATE_DICT = "outside_state_dict"  # a tensor outside the chosen state dict
NOT_SCALAR = "not_scalar"  # neither a tensor nor a scalar fit for __metadata__
# a sparse, nested or subclass tensor (DTensor, jagged): its parts are not the model's tensors
COMPOSITE_TENSOR = "composite_tensor"
# the same, or a quantized tensor, in a DCP output
COMPOSITE_DCP = "composite_dcp"
NOT_PLAIN = "not_plain"  # an object with no plain equivalent (a DCP output pickles plain values)
TENSOR_IN_VALUE = "tensor_in_value"  # a tuple/set/array holding tensors: DCP pickles it whole


@dataclass(frozen=True)
class LeftOut:
    """An entry of the input that the output does not hold, and why (``reason``: one of
    ``NONE_ENTRY``, ``RESERVED_KEY``, ``OUTSIDE_STATE_DICT``, ``NOT_SCALAR``,
    ``COMPOSITE_TENSOR``, ``COMPOSITE_DCP``, ``NOT_PLAIN``, ``TENSOR_IN_VALUE``)."""

    name: str
    reason: str

    @property
    def description(self) -> str:
        """The reason in words, e.g. ``not a scalar``."""
        if self.reason == RESERVED_KEY:
            return f"the metadata key {self.name!r} is reserved"
        return {
            NONE_ENTRY: "None",
            OUTSIDE_STATE_DICT: "a tensor outside the chosen state dict",
            NOT_SCALAR: "not a scalar",
            COMPOSITE_TENSOR: "a sparse, nested or subclass tensor (e.g. DTensor), which "
            "safetensors cannot store",
            COMPOSITE_DCP: "a sparse, nested, quantized or subclass tensor (e.g. DTensor), "
            "which ckpttool does not write to DCP",
            NOT_PLAIN: "an object with no plain equivalent",
            TENSOR_IN_VALUE: "a tuple, set or array holding tensors, which DCP would pickle "
            "whole",
        }[self.reason]

    def __str__(self) -> str:
        return f"{self.name} ({self.description})"
