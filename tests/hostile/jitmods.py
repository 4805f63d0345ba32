"""TorchScript modules for the hostile corpus (imported only by builders that need torch).

``FileOnLoad``'s ``__setstate__`` is TorchScript code that ``torch.jit.load`` (and
``torch.load``, which hands TorchScript archives to it) runs while loading: it creates the
file named in its state with ``torch.from_file(path, shared=True, size=4)``.
"""

from __future__ import annotations

import torch


class Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class FileOnLoad(torch.nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.w = torch.arange(6.0).reshape(2, 3)
        self.buf = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w.sum() + self.buf.sum()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.w = state[1]
        self.training = state[2]
        self.buf = torch.from_file(self.path, True, 4)


def save_plain(path: str) -> None:
    torch.jit.save(torch.jit.script(Plain()), path)


def save_file_on_load(path: str, marker: str) -> None:
    torch.jit.save(torch.jit.script(FileOnLoad(marker)), path)
