"""Render reports as text tables (tabulate) or JSON. Never imports torch."""

from __future__ import annotations

from typing import Any

_FORMAT_NAMES = {
    "zip": "torch zip",
    "legacy": "torch legacy (pre-1.6)",
    "torchscript": "TorchScript archive",
    "safetensors": "safetensors",
    "hf-sharded": "sharded safetensors/torch (Hugging Face index)",
    "dcp": "torch.distributed.checkpoint folder (DCP)",
}


def escape(text: str) -> str:
    """Show control characters (terminal escapes in hostile key names) as Python escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError


def to_json(report: dict[str, Any]) -> str:
    import json  # here: a writer's report needs only escape

    return json.dumps(report, indent=2, ensure_ascii=True)


def summary(report: dict[str, Any], fmt: str = "simple") -> str:
    """The text report of ``inspect``: the file, then one table per part, then the warnings."""
    from .tables import tabulate  # here: a writer's report needs only escape (~5 ms)

    lines = _header(report)

    def table(title: str, rows: list[list[Any]], headers: list[str]) -> None:
        if rows:
            lines.append("")
            lines.append(title)
            lines.append(tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True))

    if report.get("distributed"):
        _distributed(report["distributed"], lines, table)
    _tables(report, table)
    if report["shared"]:
        lines.append("")
        lines.append("shared storages")
        for group in report["shared"][:20]:
            lines.append("  " + " = ".join(escape(n) for n in group))
        if len(report["shared"]) > 20:
            lines.append(f"  ... and {len(report['shared']) - 20} more groups")
    if report["warnings"]:
        lines.append("")
        lines.append("warnings")
        lines += [f"- {escape(w)}" for w in report["warnings"]]
    return "\n".join(lines)


def _header(report: dict[str, Any]) -> list[str]:
    """path, format, size and tensor counts: the first lines of the summary."""
    facts = report["facts"]
    fmt_name = _FORMAT_NAMES.get(report["format"], report["format"])
    if report["format"] in ("zip", "torchscript") and "archive_name" in facts:
        fmt_name += f" (archive '{escape(facts['archive_name'])}'"
        if facts.get("byteorder") == "big":
            fmt_name += ", big-endian"
        fmt_name += ")"
    folder = report.get("folder")
    chosen = []
    if folder:  # a model folder: which file was read, as transformers chooses it
        why = {"config": "config.json's transformers_weights", "index": "its only index"}.get(
            folder["chosen_by"], "what transformers loads"
        )
        ignored = f"; ignored: {', '.join(folder['ignored'])}" if folder["ignored"] else ""
        chosen = [f"folder:   {escape(folder['path'])} (read {folder['weights']}: {why}{ignored})"]
    return [
        f"path:     {escape(report['path'])}",
        *chosen,
        f"format:   {fmt_name}",
        f"size:     {human_bytes(report['file_bytes'])} ({report['file_bytes']:,} bytes)",
        f"tensors:  {report['tensor_count']:,} in {report['storage_count']:,} storages, "
        f"{report['parameters']:,} parameters, {human_bytes(report['tensor_bytes'])}",
        *_verdict_line(report),
    ]


_VERDICT_WORDS = {
    "safe": "safe (loading calls only allowlisted torch and data callables)",
    "unvetted code": "unvetted code (loading imports and runs classes or code nobody vetted)",
    "dangerous": "dangerous (loading can run code)",
}


def _verdict_line(report: dict[str, Any]) -> list[str]:
    v = report.get("verdict") or {}
    kind = v.get("kind")
    if kind not in _VERDICT_WORDS:
        return []
    why = v.get("reasons") or []
    return [f"safety:   {_VERDICT_WORDS[kind]}" + (f": {escape(why[0])}" if why else "")]


def _tables(report: dict[str, Any], table: Any) -> None:
    """The summary's tables: saved devices, dtypes, state dicts, entries, globals."""
    table(
        "saved devices",
        [
            [escape(k), f"{v['storages']:,}", human_bytes(v["bytes"])]
            for k, v in report["devices"].items()
        ],
        ["device", "storages", "bytes"],
    )
    table(
        "dtypes",
        [[k, f"{v['storages']:,}", human_bytes(v["bytes"])] for k, v in report["dtypes"].items()],
        ["dtype", "storages", "bytes"],
    )
    modules = any(s["source"] == "module" for s in report["state_dicts"])
    table(
        "state dicts",
        [
            [escape(s["path"]) or "(root)", f"{s['tensors']:,}", escape(s["prefix"] or "-")]
            + (["whole pickled module" if s["source"] == "module" else ""] if modules else [])
            for s in report["state_dicts"]
        ],
        ["path", "tensors", "key prefix"] + (["source"] if modules else []),
    )
    table(
        "entries",
        [[escape(e["path"]), escape(e["value"])] for e in report["entries"]],
        ["key", "value"],
    )
    table(
        "globals",
        [[escape(g["name"]), g["kind"]] for g in report["globals"]],
        ["global", "kind"],
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _distributed(dist: dict[str, Any], lines: list[str], table: Any) -> None:
    """The layout of a folder of shards: kind, ranks, groups, what consolidation makes."""
    files = dist["files"]
    lines.append(
        f"layout:   {dist['kind_name']}, {_count(dist['world_size'], 'rank')}, "
        f"{_count(len(files), 'file')}, {_count(dist['logical_tensors'], 'logical tensor')}"
        + (", Lightning's meta.pt" if dist["facts"].get("lightning_meta") else "")
    )
    if "megatron" in dist["facts"]:
        lines.append(_megatron(dist["facts"]["megatron"]))
    table(
        "tensor groups",
        [
            [g, f"{v['tensors']:,}", human_bytes(v["bytes"]), ", ".join(v["dtypes"])]
            for g, v in dist["groups"].items()
        ],
        ["group", "tensors", "bytes", "dtypes"],
    )
    into = dist["consolidates_into"]
    lines.append("")
    lines.append("consolidates into")
    if "model" in into:
        m = into["model"]
        where = f" '{escape(m['path'])}'" if m["path"] else ""
        lines.append(
            f"- model state dict{where}: {m['tensors']:,} tensors, {human_bytes(m['bytes'])}"
            " (the default)"
        )
    e = into["everything"]
    lightning = dist["facts"].get("lightning_meta")
    meta = " (with the entries of Lightning's meta.pt)" if lightning else ""
    lines.append(f"- everything: {e['tensors']:,} tensors, {human_bytes(e['bytes'])}{meta}")


def _megatron(m: dict[str, Any]) -> str:
    """megatron-core's facts: backend, iteration, parallel sizes, which folder was read."""
    parts = [f"megatron-core {escape(str(m.get('backend')))}"]
    parts += [f"{key} {m[key]:,}" for key in ("iteration", "step") if key in m]
    sizes = [("tensor", "tensor_parallel"), ("pipeline", "pipeline_parallel")]
    sizes += [("context", "context_parallel"), ("expert", "expert_parallel")]
    parts += [f"{word} parallel {m[key]}" for word, key in sizes if key in m]
    if "chosen" in m:
        by = "NeMo's weights folder" if m.get("by") == "NeMo" else f"named by {m.get('by')}"
        parts.append(f"read {escape(str(m['chosen']))}/ ({escape(str(by))})")
    if m.get("reformulated"):
        n = len(m["reformulated"])
        parts.append(f"{n} N-D reformulated optimizer tensor{'s' * (n != 1)} reshaped")
    return "megatron: " + ", ".join(parts)


def _tensor_size(row: dict[str, Any]) -> str:
    """torch's ``Tensor.nbytes``; for quint4x2/quint2x4, which torch counts a byte per element,
    also the bytes their packed values take."""
    from .model import PACKED

    per = PACKED.get(row["dtype"])
    if per is None or row["shape"] is None:
        return human_bytes(row["nbytes"])
    numel = 1
    for n in row["shape"]:
        numel *= n
    return f"{human_bytes(row['nbytes'])} ({human_bytes(-(-numel // per))} packed)"


def tensors_table(report: dict[str, Any], fmt: str = "simple") -> str:
    rows = [
        [
            escape(t["name"]),
            t["dtype"],
            "[" + ", ".join(map(str, t["shape"])) + "]" if t["shape"] is not None else "?",
            escape(t["device"]) or "-",
            _tensor_size(t),
            ", ".join(escape(n) for n in t["shared_with"]) or "",
        ]
        for t in report["tensors"]
    ]
    from .tables import tabulate

    return tabulate(
        rows,
        headers=["name", "dtype", "shape", "saved device", "size", "shared with"],
        tablefmt=fmt,
        disable_numparse=True,
    )
