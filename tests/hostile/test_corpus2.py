"""Issue 10's corpus: every case can run code when torch.load(weights_only=False) reads it.

Each case: ``inspect`` (the real command line in a subprocess, 1 GiB address space, canary
module importable) exits 3 with one ``Danger:`` line naming the file and writes nothing;
``convert`` exits 3 and writes nothing; ``scan`` exits 3. Then the counterpart: fixtures and
the real-world files are never called dangerous.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpttool.cli import cli
from ckpttool.unpickling.discover import checkpoint_files, scan_file

from . import contract as C
from .corpus import install_canary, marker_path
from .corpus2 import CASES2, RETIRED, RETIRED_CASES, Case2, by_family

ROOT = Path(__file__).resolve().parents[2]
REAL_WORLD = ROOT.parent / "shared" / "real-world"

# Class 1 of the issue, by name: each must have its own case.
ISSUE_CALLABLES = {
    "pydoc.pipepager", "uuid._get_command_stdout", "_osx_support._read_output",
    "imaplib.IMAP4_stream", "torch.utils.collect_env.run",
    "torch._inductor.cpp_builder.run_compile_cmd", "torch.fx.graph_module._exec_with_source",
    "torch.fx.experimental.symbolic_shapes.ShapeEnv.evaluate_guards_expression",
    "idlelib.debugobj.ObjectTreeItem.SetText", "idlelib.calltip.get_entity",
    "idlelib.calltip.Calltip.fetch_tip", "idlelib.run.Executive.runcode", "doctest.debug_script",
    "numpy.f2py.crackfortran.getlincoef", "typing.ForwardRef._evaluate",
    "_xxsubinterpreters.run_string", "ensurepip._run_pip",
    "test.support.script_helper.assert_python_ok",
    "torch.utils.data.datapipes.utils.decoder.basichandlers",
    "torch.utils._config_module.ConfigModule.load_config", "venv.create", "logging.FileHandler",
    "logging.config.dictConfig", "functools.partial", "_operator.attrgetter",
    "_operator.methodcaller", "pydoc.locate", "pkgutil.resolve_name",
    "_frozen_importlib._call_with_frames_removed", "torch.utils.cpp_extension.load_inline",
    "torch._ops.ops.load_library", "linecache.getline",
}  # fmt: skip
ISSUE_DOTTED = {
    "builtins.eval.__call__", "builtins.eval.__self__.exec", "argparse._os.system",
    "logging.os.system", "torch.os.system", "torch.serialization.pickle.loads",
    "numpy.lib._datasource.os.system",
}  # fmt: skip


def _ids(cases: list[Case2]) -> list[str]:
    return [c.id for c in cases]


@pytest.mark.parametrize("case", CASES2, ids=_ids(CASES2))
def test_inspect_exits_3_and_runs_nothing(case: Case2, tmp_path: Path) -> None:
    case_dir = tmp_path / "case_dir"
    case_dir.mkdir()
    site = tmp_path / "canary_site"
    marker = marker_path(case_dir)
    install_canary(site, marker)
    path = case.build(case_dir)
    before = C.listing(tmp_path)
    res = C.run_tool(C.tool_argv(path), cwd=tmp_path, env=C.tool_env(site))
    problems = C.check_generic(res, marker=marker)
    if res.rc != C.EXIT_DANGEROUS:
        problems.append(f"exit {res.rc}, want 3")
    line = res.err.rstrip("\n")
    if not line.startswith(C.DANGEROUS_PREFIX) or path.name not in line:
        problems.append("stderr is not one Danger: line naming the file")
    for internal in ("Opaque", "_Named", "TensorRef", "ck_"):
        if internal in res.err:
            problems.append(f"stderr leaks the internal name {internal!r}")
    if C.listing(tmp_path) != before:
        problems.append("the filesystem changed")
    assert not problems, f"[{case.id}] " + "; ".join(problems) + "\n" + res.describe()


def test_convert_and_scan_exit_3_and_write_nothing(tmp_path: Path) -> None:
    runner = CliRunner()
    failures = []
    for case in CASES2:
        d = tmp_path / case.id
        d.mkdir()
        path = case.build(d)
        before = C.listing(d)
        out = d / "out.pt"
        conv = runner.invoke(cli, ["convert", str(path), str(out), "--allow-user-classes"])
        scan = runner.invoke(cli, ["scan", str(path)])
        scan_json = runner.invoke(cli, ["scan", "--json", str(path)])
        verdicts = [f["verdict"] for f in json.loads(scan_json.stdout)["files"]]
        if (conv.exit_code, scan.exit_code, scan_json.exit_code, verdicts) != (
            3,
            3,
            3,
            ["dangerous"],
        ):
            failures.append((case.id, conv.exit_code, scan.exit_code, verdicts))
        if C.listing(d) != before or marker_path(d).exists():
            failures.append((case.id, "wrote something"))
    assert not failures, failures


def test_corpus_covers_every_class_of_the_issue() -> None:
    families = by_family()
    assert {k: len(v) >= 9 for k, v in families.items()} == {
        "callable": True,
        "dotted": True,
        "wrapper": True,
        "parse": True,
    }
    named: set[str] = set()
    for case in CASES2:
        named |= {g.name for g in _verdict_globals(case)}
    assert named >= ISSUE_CALLABLES, sorted(ISSUE_CALLABLES - named)
    assert named >= ISSUE_DOTTED, sorted(ISSUE_DOTTED - named)


def _verdict_globals(case: Case2) -> list:  # type: ignore[type-arg]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(scan_file(str(case.build(Path(d)))).globals)


# --- never a false alarm -------------------------------------------------------------------
def _real_files() -> list[Path]:
    files = [Path(p) for p in checkpoint_files(str(ROOT / "fixtures"))]
    if REAL_WORLD.is_dir():
        files += [p for p in sorted(REAL_WORLD.iterdir()) if p.suffix not in (".md", ".tsv")]
        files = [p for p in files if p.name != "expected.jsonl"]
    return [p for p in files if p.name != "malicious.pt"]


@pytest.mark.parametrize("path", _real_files(), ids=lambda p: p.name)
def test_real_checkpoints_are_never_dangerous(path: Path) -> None:
    verdict = scan_file(str(path))
    assert verdict.dangerous == [], [g for g in verdict.globals if g.kind == "dangerous"]
    assert not verdict.notes


def test_scan_of_fixtures_and_real_world_folders(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["scan", "--json", str(ROOT / "fixtures")])
    assert res.exit_code == 3  # fixtures/malicious.pt, and only it
    files = json.loads(res.stdout)["files"]
    assert [f["path"] for f in files if f["verdict"] == "dangerous"] == [
        str(ROOT / "fixtures" / "malicious.pt")
    ]
    assert {f["verdict"] for f in files} == {"safe", "unvetted code", "dangerous"}
    if REAL_WORLD.is_dir():  # whole pickled models and TorchScript: unvetted code, exit 5
        res = runner.invoke(cli, ["scan", str(REAL_WORLD)])
        assert res.exit_code == 5, res.output
        assert len(res.stdout.splitlines()) == 16


def test_walker_sees_the_globals_pickletools_sees_in_real_files() -> None:
    if not REAL_WORLD.is_dir():
        pytest.skip("../shared/real-world is absent")
    for line in (REAL_WORLD / "expected.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("globals") is None:
            continue
        names = {g.name for g in scan_file(str(REAL_WORLD / rec["file"])).globals}
        assert set(rec["globals"]) <= names, (rec["file"], set(rec["globals"]) - names)
        unsafe = set(rec.get("unsafe_globals") or ())
        kinds = {g.name: g.kind for g in scan_file(str(REAL_WORLD / rec["file"])).globals}
        assert all(kinds[n] in ("data", "unvetted code") for n in unsafe), rec["file"]


@pytest.mark.parametrize("case", RETIRED_CASES, ids=_ids(RETIRED_CASES))
def test_cases_torch_never_runs_get_the_verdict_torch_earns(case: Case2, tmp_path: Path) -> None:
    """torch.load does not run these payloads (see corpus2.RETIRED): the verdict says what
    torch does with the file, not what a naive reader of every pickle in it would fear."""
    from ckpttool.ops.scan import scan

    path = case.build(tmp_path)
    assert scan([path]).files[0].verdict == RETIRED[case.id]
