"""Issue 19 (items 1-4) against real transformers output: a tiny GPT-2 with tied embeddings,
written by ``save_pretrained`` and read back by ``from_pretrained`` (the oracle for which
weights a folder serves), checked with a real strict ``load_state_dict``. Nothing is
downloaded; the module skips without transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ckpttool  # noqa: E402
from ckpttool.ops.check import check  # noqa: E402
from ckpttool.ops.diff import diff  # noqa: E402
from ckpttool.readers import open_checkpoint  # noqa: E402

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SETS = (SAFE, SAFE_INDEX, BIN, BIN_INDEX)  # one seed each: 10, 11, 12, 13
CONFIG = dict(
    n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
)  # fmt: skip
EMBED, HEAD = "transformer.wte.weight", "lm_head.weight"


def gpt2(seed: int) -> Any:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    return model.eval()


def from_pretrained(folder: Path) -> Any:
    return transformers.GPT2LMHeadModel.from_pretrained(folder)


def write_set(model: Any, folder: Path, name: str) -> None:
    """One weight set as Hugging Face tools write it: ``save_pretrained`` for safetensors
    (one file, or shards with their index); for ``.bin``, what ``save_pretrained`` wrote with
    ``safe_serialization=False`` before transformers 5 dropped it (``torch.save`` of the
    state dict, tied tensors sharing one storage; shards with an index)."""
    if name in (SAFE, SAFE_INDEX):
        model.save_pretrained(folder, max_shard_size="20KB" if name == SAFE_INDEX else "5GB")
        return
    model.config.save_pretrained(folder)
    sd = model.state_dict()
    if name == BIN:
        torch.save(sd, folder / BIN)
        return
    keys = list(sd)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({k: sd[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / BIN_INDEX).write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each weight set alone in its folder, from a model of its own (seed 10 + its index)."""
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("sets")
    out = {}
    for i, name in enumerate(SETS):
        folder = root / name.replace(".", "_")
        folder.mkdir()
        write_set(gpt2(10 + i), folder, name)
        out[name] = folder
    return out


def combine(staged: dict[str, Path], names: tuple[str, ...], folder: Path) -> Path:
    folder.mkdir()
    for name in names:
        for f in staged[name].iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def served(model: Any, staged: dict[str, Path]) -> str:
    """Which weight set ``model`` (from from_pretrained) holds, by its embeddings."""
    wte = model.transformer.wte.weight.detach()
    found = [
        n
        for n, i in zip(SETS, range(10, 14), strict=True)
        if torch.equal(wte, gpt2(i).transformer.wte.weight)
    ]
    assert len(found) == 1, found
    return found[0]


# -- 1. a folder serves the weights transformers loads, and says so ---------------------------
FOLDERS = [c for n in (2, 3, 4) for c in combinations(SETS, n)]


@pytest.mark.parametrize("names", FOLDERS, ids=["+".join(c) for c in FOLDERS])
def test_folder_reads_what_from_pretrained_loads(
    staged: dict[str, Path], tmp_path: Path, run_cli: Callable[..., Any], names: tuple[str, ...]
) -> None:
    """Before: a folder with model.safetensors and its index read the index (stale weights)."""
    folder = combine(staged, names, tmp_path / "model")
    loaded = from_pretrained(folder)
    chosen = served(loaded, staged)
    assert chosen == names[0]  # transformers' order, as SETS lists it
    ckpt = open_checkpoint(folder)
    assert ckpt.facts["folder"]["weights"] == chosen
    assert ckpt.facts["folder"]["ignored"] == list(names[1:])
    with pytest.warns(ckpttool.CheckpointWarning, match="weight sets"):
        got = ckpttool.load(folder)
    truth = loaded.state_dict()
    assert set(got) <= set(truth) and EMBED in got
    assert all(torch.equal(got[k], truth[k]) for k in got)
    res = run_cli("inspect", "--json", folder)
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["folder"]["weights"] == chosen and report["folder"]["ignored"] == list(names[1:])
    assert any("weight sets" in w and chosen in w for w in report["warnings"])
    text = run_cli("inspect", folder).stdout
    assert f"(read {chosen}: what transformers loads; ignored: {', '.join(names[1:])})" in text
    same = run_cli("diff", folder, staged[chosen])
    assert same.exit_code == 0, same.stdout
    assert "note: " in same.stdout and "weight sets" in same.stdout
    other = run_cli("diff", folder, staged[names[1]])
    assert other.exit_code == 4  # the ignored set holds other weights


def test_config_transformers_weights_wins(staged: dict[str, Path], tmp_path: Path) -> None:
    import inspect

    if "transformers_weights" not in inspect.getsource(transformers.modeling_utils):
        pytest.skip(f"transformers {transformers.__version__} ignores transformers_weights")
    folder = combine(staged, (SAFE, SAFE_INDEX), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": SAFE_INDEX}))
    assert served(from_pretrained(folder), staged) == SAFE_INDEX
    fact = open_checkpoint(folder).facts["folder"]
    assert (fact["weights"], fact["chosen_by"], fact["ignored"]) == (SAFE_INDEX, "config", [SAFE])


def _train_pt(path: Path, seed: int = 20, step: int = 7) -> Any:
    """A training checkpoint: model, AdamW state, scalars (the tied head shares wte)."""
    model = gpt2(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.arange(8)[None]
    model(ids, labels=ids).loss.backward()
    opt.step()
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "epoch": 1,
        "lr": 0.001,
        "config": model.config.to_dict(),
    }
    torch.save(ckpt, path)
    return model


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_shards_never_land_beside_a_model_safetensors(
    staged: dict[str, Path], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """Before: the shards were written beside model.safetensors without --force, and
    from_pretrained kept serving the old model.safetensors."""
    new = _train_pt(tmp_path / "train.pt")
    folder = combine(staged, (SAFE,), tmp_path / "model")
    before = _snapshot(folder)
    args = ("to-safetensors", tmp_path / "train.pt", folder, "--max-shard-size", "20KB")
    res = run_cli(*args)
    assert res.exit_code == 1 and _snapshot(folder) == before
    assert res.stderr.strip() == (
        f"Error: {folder}: the folder holds model.safetensors: shards beside it make a second "
        "weight set; pass --force to replace that set"
    )
    assert run_cli(*args, "--force").exit_code == 0
    assert SAFE not in os.listdir(folder) and SAFE_INDEX in os.listdir(folder)
    assert {"config.json", "generation_config.json"} <= set(os.listdir(folder))
    loaded = from_pretrained(folder)
    assert torch.equal(loaded.transformer.wte.weight, new.transformer.wte.weight)
    assert open_checkpoint(folder).facts["folder"] == {
        "path": os.fspath(folder),
        "weights": SAFE_INDEX,
        "chosen_by": "transformers",
        "ignored": [],
    }


def test_one_file_never_lands_beside_shards(
    staged: dict[str, Path], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """Before: model.safetensors was written into a folder of shards, whose index other tools
    kept reading."""
    new = _train_pt(tmp_path / "train.pt")
    folder = combine(staged, (SAFE_INDEX,), tmp_path / "model")
    shards = sorted(n for n in os.listdir(folder) if n.startswith("model-"))
    before = _snapshot(folder)
    args = ("to-safetensors", tmp_path / "train.pt", folder / SAFE)
    res = run_cli(*args)
    assert res.exit_code == 1 and _snapshot(folder) == before
    assert res.stderr.strip() == (
        f"Error: {folder / SAFE}: the folder holds sharded weights ({SAFE_INDEX}, "
        f"{len(shards)} shards): model.safetensors beside them makes a second weight set; "
        "pass --force to replace that set"
    )
    assert run_cli(*args, "--force").exit_code == 0
    names = os.listdir(folder)
    assert SAFE in names and SAFE_INDEX not in names and not set(shards) & set(names)
    assert not [n for n in names if n.startswith(".")]  # no temp folder left
    loaded = from_pretrained(folder)
    assert torch.equal(loaded.transformer.wte.weight, new.transformer.wte.weight)


def test_a_set_that_is_the_input_is_never_replaced(
    staged: dict[str, Path], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    folder = combine(staged, (SAFE,), tmp_path / "model")
    before = _snapshot(folder)
    res = run_cli("to-safetensors", folder / SAFE, folder, "--max-shard-size", "20KB", "--force")
    assert res.exit_code == 1 and _snapshot(folder) == before
    assert res.stderr.strip() == f"Error: {folder}: output is the input file (model.safetensors)"
    sharded = combine(staged, (SAFE_INDEX,), tmp_path / "sharded")
    before = _snapshot(sharded)
    res = run_cli("to-safetensors", sharded, sharded / SAFE, "--force")
    assert res.exit_code == 1 and _snapshot(sharded) == before
    assert "would replace the input's" in res.stderr


def test_writing_beside_a_bin_says_which_set_is_served(
    staged: dict[str, Path], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    folder = combine(staged, (BIN,), tmp_path / "model")
    res = run_cli("to-safetensors", folder / BIN, folder / SAFE)
    assert res.exit_code == 0, res.stderr
    assert f"note: {folder} holds two weight sets: model.safetensors is read" in res.stderr
    assert served(from_pretrained(folder), staged) == BIN  # the same weights, now as safetensors


# -- 2. diff verifies what to-safetensors extracted ---------------------------------------------
@pytest.mark.parametrize("sharded", [False, True], ids=["file", "shards"])
def test_diff_verifies_an_extraction(
    tmp_path: Path, run_cli: Callable[..., Any], sharded: bool
) -> None:
    """Before: exit 4, the tied head "only in A" and one '-> (absent)' line per optimizer
    setting (43 of them here)."""
    train = tmp_path / "train.pt"
    _train_pt(train)
    out = tmp_path / ("shards" if sharded else "model.safetensors")
    extra = ("--max-shard-size", "20KB") if sharded else ()
    assert run_cli("to-safetensors", train, out, *extra).exit_code == 0
    # torch's view: every tensor of the model state dict comes back, the tied head included
    truth = torch.load(train)["model"]
    back = ckpttool.load(out)
    assert set(back) == set(truth) and all(torch.equal(back[k], truth[k]) for k in truth)
    for a, b in ((train, out), (out, train)):
        res = run_cli("diff", a, b)
        assert res.exit_code == 0, res.stdout
        assert "(absent)" not in res.stdout and "only in" not in res.stdout
        side = "A" if a == train else "B"
        unheld = [line for line in res.stdout.splitlines() if line.startswith("not compared")]
        assert unheld == [
            f"not compared: 2 entries of {side} (optimizer, config), which the other side does "
            "not hold (safetensors holds tensors and string metadata only)"
        ]
        assert res.stdout.rstrip().endswith("equal: 29 tensors bit for bit, 3 entries")
    report = json.loads(run_cli("diff", "--json", train, out).stdout)
    assert report["equal"] and report["only_b"] == [] and len(report["tensors"]) == 29
    assert report["not_compared"] == {"a": ["optimizer", "config"], "b": []}
    head = next(t for t in report["tensors"] if t["key"] == HEAD)
    assert head["equal"] and head["key_b"] == HEAD


def test_diff_still_sees_what_differs(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """What safetensors can hold is compared: a changed weight and a changed step differ."""
    _train_pt(tmp_path / "train.pt")
    assert (
        run_cli("to-safetensors", tmp_path / "train.pt", tmp_path / "m.safetensors").exit_code == 0
    )
    _train_pt(tmp_path / "later.pt", seed=21, step=8)
    res = run_cli("diff", tmp_path / "later.pt", tmp_path / "m.safetensors")
    assert res.exit_code == 4
    assert "  step: 8 -> 7" in res.stdout and "lm_head.weight" in res.stdout
    r = diff(tmp_path / "later.pt", tmp_path / "m.safetensors")
    assert [(e.path, e.a, e.b) for e in r.entries] == [("step", "8", "7")]
    assert len(r.changed) == 29 and r.unheld_a == ("optimizer", "config")


def test_diff_against_a_folder_whose_config_ties_the_head(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """save_pretrained stores the tied head once; its config.json says so."""
    model = gpt2(30)
    model.save_pretrained(tmp_path / "hf")
    torch.save(model.state_dict(), tmp_path / "fixed.pt")
    res = run_cli("diff", tmp_path / "fixed.pt", tmp_path / "hf")
    assert res.exit_code == 0, res.stdout
    assert f"note: B stores {HEAD} once as {EMBED} (its config.json ties them)" in res.stdout


# -- 3. check: tied weights that load are not "would not load" --------------------------------
def test_check_against_a_folder_whose_config_ties_the_head(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """Before: 'would not load: 1 unexpected (lm_head.weight)', exit 4."""
    model = gpt2(31)
    model.save_pretrained(tmp_path / "hf")
    sd = model.state_dict()
    torch.save(sd, tmp_path / "fixed.pt")
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    fresh.load_state_dict(torch.load(tmp_path / "fixed.pt"), strict=True)  # torch: it loads
    for ref in (tmp_path / "hf", tmp_path / "hf" / SAFE):
        r = check(tmp_path / "fixed.pt", ref)
        assert r.loads, r.problems
        assert [d.keys for d in r.diagnoses] == [(HEAD, EMBED)]
        res = run_cli("check", tmp_path / "fixed.pt", "--against", ref)
        assert res.exit_code == 0 and "would load (strict=True)" in res.stdout
        assert "(config.json: tie_word_embeddings, true by default)" in res.stdout
    # transformers 4 left the default (true) out of config.json
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert transformers.GPT2Config.from_pretrained(tmp_path / "hf").tie_word_embeddings
    assert check(tmp_path / "fixed.pt", tmp_path / "hf").loads


def test_check_against_a_base_model_folder_without_head(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """GPT2Model has no lm_head: the tied head of an LM checkpoint is unexpected there."""
    base = transformers.GPT2Model(transformers.GPT2Config(**CONFIG))
    base.save_pretrained(tmp_path / "base")
    sd = gpt2(34).state_dict()
    torch.save(sd, tmp_path / "fixed.pt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        base.load_state_dict({k.removeprefix("transformer."): v for k, v in sd.items()})
    r = check(tmp_path / "fixed.pt", tmp_path / "base")
    assert not r.loads and r.after_fixes.unexpected == (HEAD,)
    assert run_cli("check", tmp_path / "fixed.pt", "--against", tmp_path / "base").exit_code == 4


def _factory(tmp_path: Path) -> str:
    path = tmp_path / "tiny_gpt2.py"
    path.write_text(
        "import transformers\n\n\ndef build():\n"
        f"    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{CONFIG!r}))\n"
    )
    return f"{path}:build"


def test_check_safetensors_aliases_against_a_model(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """Before: 'would not load: 1 missing (lm_head.weight)', exit 4, although the alias is
    recorded and ckpttool.load returns it."""
    model = gpt2(32)
    torch.save(model.state_dict(), tmp_path / "fixed.pt")
    out = tmp_path / "model.safetensors"
    assert run_cli("to-safetensors", tmp_path / "fixed.pt", out).exit_code == 0
    spec = _factory(tmp_path)
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    fresh.load_state_dict(ckpttool.load(out), strict=True)  # torch: it loads
    r = check(out, model=spec)
    assert r.loads, r.problems
    res = run_cli("check", out, "--model", spec)
    assert res.exit_code == 0 and "would load (strict=True)" in res.stdout
    assert "recorded in ckpttool.aliases" in res.stdout


def test_check_still_refuses_a_head_that_is_missing(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """save_pretrained's own file lacks the tied head: a strict load_state_dict fails."""
    from safetensors.torch import load_file

    gpt2(33).save_pretrained(tmp_path / "hf")
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(load_file(tmp_path / "hf" / SAFE), strict=True)
    r = check(tmp_path / "hf" / SAFE, model=_factory(tmp_path))
    assert not r.loads and r.problems.missing == (HEAD,)
    assert run_cli("check", tmp_path / "hf", "--model", _factory(tmp_path)).exit_code == 4


# -- 4. inspect counts a tied weight once -------------------------------------------------------
def test_parameters_count_tied_weights_once(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """Before: 30,080 (the tied wte counted twice) instead of 28,032."""
    model = _train_pt(tmp_path / "train.pt")
    expected = sum(p.numel() for p in model.parameters())
    assert expected == model.num_parameters() == 28_032
    torch.save(model.state_dict(), tmp_path / "fixed.pt")
    model.save_pretrained(tmp_path / "hf")
    assert (
        run_cli("to-safetensors", tmp_path / "fixed.pt", tmp_path / "m.safetensors").exit_code == 0
    )
    for path in ("fixed.pt", "train.pt", "hf", "m.safetensors"):
        res = run_cli("inspect", "--json", tmp_path / path)
        assert json.loads(res.stdout)["parameters"] == expected, path
    assert (
        "29 in 28 storages, 28,032 parameters" in run_cli("inspect", tmp_path / "fixed.pt").stdout
    )
