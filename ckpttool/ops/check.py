"""``check``: would ``model.load_state_dict(sd, strict=True)`` succeed, and if not, what fixes it?

The model's side is a reference checkpoint (its state dict's keys, shapes and dtypes: a
safetensors file or Hugging Face index is exactly that), or, as an explicit opt-in that imports
and runs user code, a model factory built on torch's meta device (no memory, no weights).
Mismatches are diagnosed in domain words: key renames (a wrapper prefix to strip, add or
replace, a renamed block), transposed weights, a resized vocabulary, tied weights stored once,
dtype casts. The command line turns a :class:`KeyFix` into the exact command that applies it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CheckpointError
from .keysets import KeySet, KeySpec, checkpoint_keys, model_keys, with_config_ties


@dataclass(frozen=True)
class KeyFix:
    """A key rename that makes the checkpoint's keys match: ``old`` becomes ``new`` at the start
    of every key that starts with ``old`` ("" ``old``: prefix every key; "" ``new``: strip)."""

    old: str
    new: str
    keys: int  # how many keys it renames

    @property
    def action(self) -> str:
        return "add" if not self.old else "strip" if not self.new else "replace"

    @property
    def description(self) -> str:
        if self.action == "add":
            return f"add the prefix {self.new!r} to every key"
        if self.action == "strip":
            return f"strip the prefix {self.old!r} from {self.keys} keys"
        return f"replace the prefix {self.old!r} by {self.new!r} in {self.keys} keys"


@dataclass(frozen=True)
class Mismatch:
    """A key both sides hold with a different shape or dtype (or not a tensor on one side)."""

    key: str  # the model's key (after the renames)
    found: KeySpec  # in the checkpoint
    expected: KeySpec  # in the model
    reason: str  # "shape", "transposed", "vocabulary", "dtype", "not a tensor"


@dataclass(frozen=True)
class Diagnosis:
    """One finding, worded for the user, with the keys it concerns."""

    kind: str  # "rename", "select", "transposed", "vocabulary", "shape", "tied", "dtype"
    message: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problems:
    """What ``load_state_dict(strict=True)`` would complain about."""

    missing: tuple[str, ...]  # keys the model has and the checkpoint lacks
    unexpected: tuple[str, ...]  # keys the checkpoint has and the model lacks
    mismatched: tuple[Mismatch, ...]  # shape (or tensor-ness) differences: load fails
    cast: tuple[Mismatch, ...]  # dtype differences: load_state_dict copies and casts

    @property
    def loads(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


@dataclass(frozen=True)
class CheckResult:
    """Whether the checkpoint loads into the model, why not, and the fix."""

    checkpoint: str
    against: str
    state_dict: str | None  # the state dict checked in the checkpoint ("" the root)
    problems: Problems  # as the checkpoint is
    fixes: tuple[KeyFix, ...]  # renames, in order, that make the keys match
    after_fixes: Problems  # what would remain after them (and after selecting the state dict)
    diagnoses: tuple[Diagnosis, ...]
    dangerous: tuple[str, ...] = ()  # dangerous globals either file names (never run)
    notes: tuple[str, ...] = ()  # about the inputs (a folder holding two weight sets)

    @property
    def loads(self) -> bool:
        return self.problems.loads

    @property
    def select(self) -> str | None:
        """The entry to take out of the checkpoint first (a training checkpoint's state dict)."""
        return self.state_dict or None


# -- comparing ------------------------------------------------------------------------------------
_VOCAB = re.compile(
    r"(^|\.)(embed|wte|word_embeddings|tok_embeddings|lm_head|embed_out|"
    r"output|decoder|shared|final_logits_bias|embeddings)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|decoder|head)\.weight$")
_EMBED = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed|shared|"
    r"embeddings|embedding)\.weight$"
)


def _mismatch(key: str, found: KeySpec, expected: KeySpec) -> Mismatch | None:
    if found == expected:
        return None
    if found.shape is None or expected.shape is None:
        if found.shape is None and expected.shape is None:
            return None  # both non-tensor values (_extra_state): set_extra_state takes them
        return Mismatch(key, found, expected, "not a tensor")
    shape_ok = found.shape == expected.shape or (found.shape == (1,) and expected.shape == ())
    if shape_ok:
        return Mismatch(key, found, expected, "dtype") if found.dtype != expected.dtype else None
    f, e = found.shape, expected.shape
    if len(f) == 2 and f == e[::-1]:
        reason = "transposed"
    elif len(f) == len(e) and f[1:] == e[1:] and _VOCAB.search(key):
        reason = "vocabulary"
    else:
        reason = "shape"
    return Mismatch(key, found, expected, reason)


def compare(found: dict[str, KeySpec], expected: dict[str, KeySpec]) -> Problems:
    """What ``load_state_dict(strict=True)`` says about ``found`` loaded into ``expected``."""
    mismatches = [
        m for k in found if k in expected if (m := _mismatch(k, found[k], expected[k])) is not None
    ]
    return Problems(
        missing=tuple(k for k in expected if k not in found),
        unexpected=tuple(k for k in found if k not in expected),
        mismatched=tuple(m for m in mismatches if m.reason != "dtype"),
        cast=tuple(m for m in mismatches if m.reason == "dtype"),
    )


def _splits(key: str) -> Iterable[tuple[str, str]]:
    """(prefix, rest) at the start and after every dot of ``key``."""
    yield "", key
    for i, c in enumerate(key):
        if c == ".":
            yield key[: i + 1], key[i + 1 :]


def _rename(keys: Iterable[str], old: str, new: str) -> dict[str, str]:
    return {k: (new + k[len(old) :] if k.startswith(old) else k) for k in keys}


def find_fixes(found: Iterable[str], expected: Iterable[str], limit: int = 3) -> list[KeyFix]:
    """Prefix renames, applied in order, that make the most keys of ``found`` match ``expected``.

    Each step picks the (old prefix, new prefix) pair that turns the most unmatched keys into
    missing ones, applies it to every key (as a converter would), and keeps it only if fewer keys
    are left unmatched and no two keys collide.
    """
    current = {k: k for k in found}  # original -> renamed
    want = set(expected)
    fixes: list[KeyFix] = []
    for _ in range(limit):
        names = set(current.values())
        extra, missing = names - want, want - names
        if not extra or not missing:
            break
        by_rest: dict[str, list[str]] = {}
        for m in missing:
            for prefix, rest in _splits(m):
                if rest:
                    by_rest.setdefault(rest, []).append(prefix)
        votes: Counter[tuple[str, str]] = Counter()
        for u in extra:
            for old, rest in _splits(u):
                prefixes = by_rest.get(rest, ())
                if 0 < len(prefixes) <= 64:
                    votes.update((old, new) for new in prefixes if new != old)
        if not votes:
            break
        (old, new), _ = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1])))
        renamed = _rename(current.values(), old, new)
        after = {o: renamed[r] for o, r in current.items()}
        new_names = set(after.values())
        bad = len(new_names ^ want) >= len(names ^ want) or len(new_names) < len(after)
        if bad:
            break
        fixes.append(KeyFix(old, new, sum(1 for r in current.values() if r.startswith(old))))
        current = after
    return fixes


def apply_fixes(keys: dict[str, KeySpec], fixes: Iterable[KeyFix]) -> dict[str, KeySpec]:
    out = dict(keys)
    for fix in fixes:
        out = {_rename([k], fix.old, fix.new)[k]: v for k, v in out.items()}
    return out


def _diagnose(
    result_path: str | None, fixes: list[KeyFix], after: Problems, ref: KeySet, ck: KeySet
) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    if result_path:
        out.append(Diagnosis("select", f"the state dict is the entry {result_path!r}"))
    for fix in fixes:
        out.append(Diagnosis("rename", fix.description))
    by_reason: dict[str, list[Mismatch]] = {}
    for m in after.mismatched:
        by_reason.setdefault(m.reason, []).append(m)
    for m in by_reason.get("transposed", []):
        out.append(
            Diagnosis(
                "transposed",
                f"{m.key} is stored transposed: "
                f"{list(m.found.shape or ())} instead of "
                f"{list(m.expected.shape or ())} (a Conv1D/Linear layout): "
                "transpose it before loading",
                (m.key,),
            )
        )
    for m in by_reason.get("vocabulary", []):
        f, e = (m.found.shape or (0,))[0], (m.expected.shape or (0,))[0]
        out.append(
            Diagnosis(
                "vocabulary",
                f"{m.key}: the vocabulary was resized ({f} rows in the "
                f"checkpoint, {e} in the model): resize the model's embeddings to "
                f"{f} before loading (or pad/trim the rows)",
                (m.key,),
            )
        )
    for m in by_reason.get("shape", []) + by_reason.get("not a tensor", []):
        out.append(
            Diagnosis(
                "shape",
                f"{m.key}: {_spec(m.found)} in the checkpoint, {_spec(m.expected)} in the model",
                (m.key,),
            )
        )
    out += _tied(fixes, after, ref, ck)
    if after.cast:
        pairs = Counter(f"{m.found.dtype} -> {m.expected.dtype}" for m in after.cast)
        shown = ", ".join(f"{n} {p}" for p, n in pairs.most_common())
        out.append(
            Diagnosis(
                "dtype",
                f"dtypes differ ({shown}): load_state_dict copies and casts "
                "them, which is not an error",
                tuple(m.key for m in after.cast),
            )
        )
    return out


def _tied(fixes: list[KeyFix], after: Problems, ref: KeySet, ck: KeySet) -> list[Diagnosis]:
    """Tied weights stored once on one side: a missing (or unexpected) alias of a present key."""
    out: list[Diagnosis] = []
    ck_keys = apply_fixes(ck.keys, fixes)
    tied_with = {k: g for g in ref.tied for k in g}
    for k in after.missing:
        partners = [p for p in tied_with.get(k, ()) if p in ck_keys and p != k]
        if not partners and _HEAD.search(k):
            spec = ref.keys[k]
            partners = [
                p for p, s in ck_keys.items() if _EMBED.search(p) and s == spec and p in ref.keys
            ]
        if partners:
            message = (
                f"{k} is missing but {partners[0]} has the same shape: the weights are tied and "
                f"stored once; tie them after a non-strict load, or copy {partners[0]} to {k}"
            )
            out.append(Diagnosis("tied", message, (k, partners[0])))
    renamed = {k: apply_fixes({k: ck.keys[k]}, fixes).popitem()[0] for g in ck.tied for k in g}
    ck_tied = {renamed[k]: [renamed[p] for p in g if p != k] for g in ck.tied for k in g}
    for k in after.unexpected:
        partners = [p for p in ck_tied.get(k, ()) if p in ref.keys]
        if partners:
            message = (
                f"{k} is unexpected but shares its tensor with {partners[0]} (tied weights): the "
                "reference stores them once, so a model that ties them loads this checkpoint; "
                f"otherwise drop {k}"
            )
            out.append(Diagnosis("tied", message, (k, partners[0])))
    for k, stored in ck.recorded:
        message = (
            f"{k} is stored once as {stored} (recorded in ckpttool.aliases): ckpttool.load "
            "returns both names; safetensors.torch.load_file only the stored one"
        )
        out.append(Diagnosis("tied", message, (k, stored)))
    for k, stored in ref.implied:
        message = (
            f"{k} is stored once as {stored} in the reference, a Hugging Face model that ties "
            "them (config.json: tie_word_embeddings, true by default): the model holds both"
        )
        out.append(Diagnosis("tied", message, (k, stored)))
    return out


def _spec(spec: KeySpec) -> str:
    return "not a tensor" if spec.shape is None else f"{spec.dtype} {list(spec.shape)}"


def check(
    ckpt_path: str | os.PathLike[str],
    against: str | os.PathLike[str] | None = None,
    *,
    model: str | None = None,
    key: str | None = None,
) -> CheckResult:
    """Would ``model.load_state_dict(state_dict, strict=True)`` succeed, and what fixes it?

    Args:
        ckpt_path: the checkpoint to load (its model state dict, or the one at ``key``).
        against: a reference checkpoint (safetensors file, HF index/folder, a torch file) whose
            state dict holds the model's keys and shapes.
        model: instead of ``against``, ``"module:factory"``: imports the module and calls the
            factory on torch's meta device (runs user code; opt in only for code you trust).
        key: the dotted path of the state dict to check in ``ckpt_path``.

    Returns:
        A :class:`CheckResult`: ``loads``, the problems as they are, the renames that fix the
        keys, what would remain after them, and the diagnoses.

    Example:
        >>> r = check("ddp_best.pth", "model.safetensors")
        >>> r.loads, [f.description for f in r.fixes]
        (False, ["strip the prefix 'module.' from 12 keys"])
    """
    if (against is None) == (model is None):
        raise CheckpointError(None, "give either a reference checkpoint or a model factory")
    ck = checkpoint_keys(ckpt_path, key)
    ref = model_keys(model) if model is not None else checkpoint_keys(os.fspath(against or ""))
    ref_as_is = with_config_ties(ref, ck.tied)
    problems = compare(ck.keys, ref_as_is.keys)
    fixes = find_fixes(ck.keys, ref.keys) if problems.missing or problems.unexpected else []
    if fixes:  # the tied names as the fixes rename them
        renamed = [
            tuple(apply_fixes(dict.fromkeys(g, KeySpec(None, None)), fixes)) for g in ck.tied
        ]
        ref = with_config_ties(ref, renamed)
        after = compare(apply_fixes(ck.keys, fixes), ref.keys)
    else:
        ref, after = ref_as_is, problems
    diagnoses = _diagnose(ck.path, fixes, after, ref, ck)
    return CheckResult(
        checkpoint=ck.source,
        against=ref.source,
        state_dict=ck.path,
        problems=problems,
        fixes=tuple(fixes),
        after_fixes=after,
        diagnoses=tuple(diagnoses),
        dangerous=tuple(dict.fromkeys(ck.dangerous + ref.dangerous)),
        notes=tuple(dict.fromkeys(ck.notes + ref.notes)),
    )


# -- grouping keys for people ---------------------------------------------------------------------
@dataclass(frozen=True)
class KeyGroup:
    pattern: str  # e.g. "layers.*.attn.q.weight" or "layers.*"
    count: int
    example: str


def group_keys(keys: Iterable[str], max_groups: int = 8) -> list[KeyGroup]:
    """Keys grouped by layer pattern (numbers as ``*``), coarser until at most ``max_groups``."""
    keys = list(keys)
    for depth in (None, 4, 3, 2, 1):
        groups: dict[str, list[str]] = {}
        for k in keys:
            parts = ["*" if p.isdigit() else p for p in k.split(".")]
            if depth is not None and len(parts) > depth:
                parts = [*parts[:depth], "*"]
            groups.setdefault(".".join(parts), []).append(k)
        if len(groups) <= max_groups or depth == 1:
            out = [KeyGroup(p, len(ks), ks[0]) for p, ks in groups.items()]
            if len(out) > max_groups:  # still too many: the rest as one line
                rest = out[max_groups - 1 :]
                out = [*out[: max_groups - 1], KeyGroup("...", sum(g.count for g in rest), "...")]
            return out
    raise AssertionError
