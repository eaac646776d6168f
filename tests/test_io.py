"""Model I/O internals: weights left on disk (stubs), streamed writes, staged saves."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

import onnxslim  # noqa: E402
from onnxslim import weights  # noqa: E402
from onnxslim.graph import StoredValues, to_gs, to_proto  # noqa: E402
from onnxslim.model import (_TMP_TAG, _HOST, load_model, save_model, session_source, stage_model)  # noqa: E402


def _models(tmp: Path) -> list[Path]:
    out = sorted(p for p in (ROOT / "models").glob("*.onnx") if p.stat().st_size < 50 << 20)
    for name, fn in sorted(fuzz.BASES.items()):
        p = tmp / f"{name}.onnx"
        p.write_bytes(fn().SerializeToString())
        out.append(p)
    return out


def test_stream_writer_equals_protobuf_serialization(tmp_path: Path) -> None:
    """write_embedded streams stub bytes from disk and produces exactly SerializeToString's bytes."""
    for p in _models(tmp_path):
        m = load_model(p, lazy=True)
        buf = io.BytesIO()
        weights.write_embedded(m.proto, buf)
        assert buf.getvalue() == p.read_bytes(), p  # these files were written by protobuf itself
        assert weights.has_stubs(m.proto) == any(len(t.raw_data) >= weights.LAZY_THRESHOLD
                                                 for t in onnx.load(str(p)).graph.initializer)
        m.close()


def test_nested_stubs_and_unknown_fields(tmp_path: Path) -> None:
    """Stubs inside subgraphs (from external data) and unknown fields survive an embedded write."""
    m = fuzz.base_if()
    # Move the weight into the Loop body's If branch as a subgraph initializer, saved externally.
    w = next(t for t in m.graph.initializer if t.name == "W")
    then = _branch(m, "then_branch")
    then.initializer.append(w)
    m.graph.initializer.remove(w)
    raw = then.initializer[0].raw_data
    then.initializer[0].ClearField("raw_data")
    then.initializer[0].data_location = TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(len(raw)))):
        e = then.initializer[0].external_data.add()
        e.key, e.value = k, v
    (tmp_path / "w.bin").write_bytes(raw)
    data = m.SerializeToString() + b"\xa8\x06\x2a"  # plus an unknown field (number 101)
    (tmp_path / "m.onnx").write_bytes(data)
    lm = load_model(tmp_path / "m.onnx", lazy=True)
    assert weights.has_stubs(lm.proto)
    buf = io.BytesIO()
    weights.write_embedded(lm.proto, buf)
    back = onnx.ModelProto()
    back.ParseFromString(buf.getvalue())
    inner = _branch(back, "then_branch").initializer[0]
    assert inner.raw_data == raw and inner.data_location == TensorProto.DEFAULT
    assert buf.getvalue().endswith(b"\xa8\x06\x2a")
    assert weights.has_stubs(lm.proto)  # the proto is left as it was
    lm.close()


def _branch(m: onnx.ModelProto, name: str) -> onnx.GraphProto:
    body = next(a.g for a in m.graph.node[2].attribute if a.name == "body")
    return next(a.g for a in body.node[1].attribute if a.name == name)


def test_unusual_wire_shapes_fall_back_to_a_normal_parse(tmp_path: Path) -> None:
    """A graph split over two fields is valid protobuf (merged on parse): loaded correctly, just not lazily."""
    m = fuzz.base_mlp()
    g1, g2 = onnx.GraphProto(), onnx.GraphProto()
    g1.CopyFrom(m.graph)
    del g1.node[3:]
    g2.node.extend(m.graph.node[3:])
    head = onnx.ModelProto()
    head.CopyFrom(m)
    head.ClearField("graph")
    data = head.SerializeToString() + b"\x3a" + _varint(g1.ByteSize()) + g1.SerializeToString() \
        + b"\x3a" + _varint(g2.ByteSize()) + g2.SerializeToString()
    (tmp_path / "split.onnx").write_bytes(data)
    lm = load_model(tmp_path / "split.onnx", lazy=True)
    assert not weights.has_stubs(lm.proto)
    assert lm.proto.graph.SerializeToString() == m.graph.SerializeToString()


def _varint(n: int) -> bytes:
    return weights.encode_varint(n)


def test_values_read_by_a_pass_leave_as_stubs(tmp_path: Path) -> None:
    p = tmp_path / "mlp.onnx"
    p.write_bytes(fuzz.base_mlp().SerializeToString())
    lm = load_model(p, lazy=True)
    g = to_gs(lm.proto)
    consts = [t for t in g.tensors().values() if hasattr(t, "_values") and isinstance(t._values, StoredValues)]
    assert len(consts) == 2
    for c in consts:
        v = c.values  # loads: a read-only memory map
        assert not v.flags.writeable
    changed = consts[0]
    changed.values = np.asarray(changed.values) * 2  # a pass making new values
    out = to_proto(g, lm.proto)
    by_name = {t.name: t for t in out.graph.initializer}
    assert weights.is_stub(by_name[consts[1].name])  # read but unchanged: still a stub, no copy made
    t = by_name[changed.name]
    assert not weights.is_stub(t) and t.data_location == TensorProto.DEFAULT  # not EXTERNAL with data
    np.testing.assert_array_equal(numpy_helper.to_array(t), np.asarray(consts[0].values))
    lm.close()


def test_api_returns_a_complete_model(tmp_path: Path) -> None:
    p = tmp_path / "cnn.onnx"
    p.write_bytes(fuzz.base_cnn().SerializeToString())
    model, report = onnxslim.optimize(p, tmp_path / "o.onnx")
    assert not weights.has_stubs(model)
    onnx.checker.check_model(model)
    assert report.written
    none, _ = onnxslim.optimize(p, tmp_path / "o2.onnx", keep_model=False)
    assert none is None and (tmp_path / "o2.onnx").read_bytes() == (tmp_path / "o.onnx").read_bytes()


def test_symlinked_input_model(tmp_path: Path) -> None:
    real = tmp_path / "real" / "m.onnx"
    real.parent.mkdir()
    real.write_bytes(fuzz.base_mlp().SerializeToString())
    os.symlink(real, tmp_path / "link.onnx")
    code, _, err = fuzz.run_cli_inprocess([str(tmp_path / "link.onnx"), str(tmp_path / "o.onnx"), "--quiet"])
    assert code == 0, err


def test_staged_model_is_complete_before_commit_and_discard_leaves_nothing(tmp_path: Path) -> None:
    m = fuzz.base_cnn()
    out = tmp_path / "o.onnx"
    for external in (False, True):
        staged = stage_model(m, out, external_data=external)
        assert not out.exists()
        onnx.checker.check_model(str(staged.path))  # loadable where it lies (data file beside it)
        loaded = onnx.load(str(staged.path))
        assert [numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer] == \
               [numpy_helper.to_array(t).tobytes() for t in m.graph.initializer]
        staged.discard()
        assert list(tmp_path.iterdir()) == []
    assert m.SerializeToString() == fuzz.base_cnn().SerializeToString()  # the proto was restored


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f".o.onnx{_TMP_TAG}{_HOST}-999999999-abc"
    alive = tmp_path / f".o.onnx{_TMP_TAG}{_HOST}-{os.getpid()}-abc"
    other_host = tmp_path / f".o.onnx{_TMP_TAG}00000000-999999999-abc"
    for d in (dead, alive, other_host):
        d.mkdir()
        (d / "o.onnx").write_bytes(b"partial")
    save_model(fuzz.base_mlp(), tmp_path / "o.onnx")
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_session_source(tmp_path: Path) -> None:
    p = tmp_path / "cnn.onnx"
    p.write_bytes(fuzz.base_cnn().SerializeToString())
    lm = load_model(p, lazy=True)
    with session_source(lm.proto) as src:
        assert isinstance(src, Path) and src.exists()
        import onnxruntime as ort

        ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    assert not src.exists()
    plain = fuzz.base_cnn()
    with session_source(plain) as src:
        assert src is plain
    lm.close()


def test_stubs_are_released_with_the_model(tmp_path: Path) -> None:
    p = tmp_path / "cnn.onnx"
    p.write_bytes(fuzz.base_cnn().SerializeToString())
    lm = load_model(p, lazy=True)
    stub = next(t for t in lm.proto.graph.initializer if weights.is_stub(t))
    lm.close()
    with pytest.raises(RuntimeError, match="released"):
        weights.stub_array(stub)
