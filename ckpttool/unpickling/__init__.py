"""The non-executing unpickler, the safety policy and the bounded opcode scan."""
