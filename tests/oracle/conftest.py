"""The oracle tests' report: accepted oddities (notes) printed at the end of the run, and the
whole comparison written as JSON to ``$CKPTTOOL_ORACLE_REPORT`` when that is set."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

REPORT: dict[str, Any] = {"notes": [], "divergences": [], "units": []}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slower checks (torch import, many builds)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT["units"]:
        return
    tr = terminalreporter
    n_div, n_notes = len(REPORT["divergences"]), len(REPORT["notes"])
    tr.section("torch oracle")
    tr.write_line(
        f"{len(REPORT['units'])} inputs compared with torch: {n_div} divergences, "
        f"{n_notes} accepted notes"
    )
    for line in REPORT["notes"]:
        tr.write_line(f"  note {line}")
    out = os.environ.get("CKPTTOOL_ORACLE_REPORT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(REPORT, f, indent=1, default=str)
        tr.write_line(f"  report written to {out}")
