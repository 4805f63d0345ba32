"""The torch oracle itself: each recorder sees what it must, and a payload stays in the child."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from .torch_oracle import Oracle

torch = pytest.importorskip("torch")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    with Oracle() as o:
        yield o


def _pickle(tmp_path: Path, name: str, body: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(body)
    return p


def test_benign_file_runs_only_allowlisted_code(oracle: Oracle) -> None:
    ob = oracle.observe(FIXTURES / "ddp_rank0_checkpoint.pt")
    assert ob.loaded_ok and ob.kind == "torch", ob.error
    assert "torch._utils._rebuild_tensor_v2" in ob.resolved_globals
    assert "argparse.Namespace" in ob.resolved_globals
    assert "torch._utils._rebuild_tensor_v2" in ob.calls
    assert ob.unvetted() == [], ob.unvetted()


def test_payload_is_recorded_refused_and_kept_in_the_child(oracle: Oracle, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    cmd = f"touch {shlex.quote(str(marker))}".encode()
    p = _pickle(tmp_path, "evil.pt", b"cos\nsystem\n(S'" + cmd + b"'\ntR.")
    ob = oracle.observe(p)
    assert ob.resolved_globals == ["os.system"]
    assert ob.unvetted_globals() == ["os.system"]
    assert any(e.startswith("os.system") for e in ob.audit_events), ob.audit_events
    assert not marker.exists()  # the oracle refuses process creation after recording it
    assert not ob.loaded_ok and "refused by the torch oracle" in (ob.error or "")


def test_marker_written_by_a_payload_is_seen(oracle: Oracle, tmp_path: Path) -> None:
    ob = oracle.observe(FIXTURES / "malicious.pt")  # exec("open('CKPTTOOL_PWNED', 'w')...")
    assert ob.marker_hit and ob.new_files[0].endswith("CKPTTOOL_PWNED")
    assert ob.resolved_globals[0] == "__builtin__.exec"  # as the pickle spells it
    assert any(e.startswith("exec") for e in ob.audit_events)
    assert not (Path.cwd() / "CKPTTOOL_PWNED").exists()  # written in the child's scratch cwd


def test_python2_spelling_is_recorded_and_resolved(oracle: Oracle, tmp_path: Path) -> None:
    p = _pickle(tmp_path, "p2.pkl", b"c__builtin__\nset\n((lp0\nI1\natR.")
    ob = oracle.observe(p, kind="pickle")
    assert ob.loaded_ok, ob.error
    assert ob.resolved_globals == ["__builtin__.set"]
    assert ob.global_owners == {"__builtin__.set": "builtins.set"}
    assert ob.unvetted() == []


def test_calls_made_by_the_unpickler_are_traced(oracle: Oracle, tmp_path: Path) -> None:
    body = b"ctextwrap\ndedent\n(S'  x'\ntR."
    ob = oracle.observe(_pickle(tmp_path, "call.pkl", body), kind="pickle")
    assert ob.loaded_ok, ob.error
    assert ob.calls == ["textwrap.dedent"] and ob.unvetted_calls() == ["textwrap.dedent"]
    body = b"ccopyreg\n_reconstructor\n(c__builtin__\nobject\ng1\nNtR."
    ob = oracle.observe(_pickle(tmp_path, "rec.pkl", body.replace(b"g1", b"c__builtin__\nobject")))
    assert "copyreg._reconstructor" in ob.calls
    assert ob.unvetted_calls() == []


def test_timeout_kills_the_load(oracle: Oracle, tmp_path: Path) -> None:
    p = _pickle(tmp_path, "sleep.pkl", b"ctime\nsleep\n(I30\ntR.")
    ob = oracle.observe(p, kind="pickle", timeout=2)
    assert ob.timed_out and not ob.loaded_ok and "timeout" in (ob.error or "")
    assert ob.unvetted_globals() == ["time.sleep"]


def test_torchscript_is_a_dispatch_to_jit_load(oracle: Oracle) -> None:
    ob = oracle.observe(FIXTURES / "torchscript_module.pt")
    assert ob.loaded_ok and ob.dispatched == ["torch.jit.load"]
    assert "dispatch torch.jit.load" in ob.unvetted()


def test_numpy_object_array(oracle: Oracle, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    p = tmp_path / "a.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    ob = oracle.observe(p)
    assert ob.kind == "numpy" and ob.loaded_ok, ob.error
    assert ob.unvetted() == []


def test_dcp_folder_is_loaded_with_dcp_to_torch_save(oracle: Oracle, tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(4.0), "step": 3}, checkpoint_id=str(tmp_path / "ck"))
    ob = oracle.observe(tmp_path / "ck")
    assert ob.kind == "dcp" and ob.loaded_ok, ob.error
    assert any("torch.distributed.checkpoint.metadata" in g for g in ob.resolved_globals)
    assert ob.unvetted() == [], ob.unvetted()


def test_batch_isolates_inputs(oracle: Oracle, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    code = f"open({str(tmp_path / 'a' / 'PWNED')!r}, 'w').close()".encode()
    evil = _pickle(tmp_path / "a", "evil.pkl", b"c__builtin__\nexec\n(S'" + code + b"'\ntR.")
    good = _pickle(tmp_path / "b", "good.pkl", b"(lp0\nI1\na.")
    obs = oracle.observe_many([evil, good, evil], kind="pickle")
    assert obs[0].marker_hit and not obs[1].marker_hit
    assert obs[1].unvetted() == [] and obs[1].loaded_ok
    assert obs[2].resolved_globals == ["__builtin__.exec"]
