"""Issue 18's attacker corpus ("safe must be a proof"): ``CASES3``, one record per case.

Every case names its class of the issue (1-11; 0 for the benign set), a builder that writes a
file or folder under a temporary folder, the verdict ``ckpttool scan`` must give (data:
``Case3.expect``, with ``also`` where two answers are as honest), and whether loading it the
way torch or numpy really does runs a payload. Payloads only ever create the case folder's
marker file (``corpus.marker_path``); ``confirm3`` checks that they really do.

The classes live in ``c3_parse`` (1, 2), ``c3_calls`` (3-5), ``c3_code`` (6-8),
``c3_limits`` (9-11) and ``c3_benign`` (0).
"""

from __future__ import annotations

from . import c3_benign, c3_calls, c3_code, c3_limits, c3_parse  # noqa: F401  (they register)
from .c3base import REGISTRY, SAFE, Case3

CASES3: list[Case3] = list(REGISTRY)
HOSTILE = [c for c in CASES3 if c.expect != SAFE]
BENIGN = [c for c in CASES3 if c.cls == 0]
PAYLOADS = [c for c in CASES3 if c.payload]


def by_class() -> dict[int, list[Case3]]:
    out: dict[int, list[Case3]] = {}
    for c in CASES3:
        out.setdefault(c.cls, []).append(c)
    return dict(sorted(out.items()))


assert len({c.id for c in CASES3}) == len(CASES3), "duplicate case ids"
