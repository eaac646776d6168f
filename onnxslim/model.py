"""Model I/O: safe loading (external data confined to the model's folder), atomic saving.

Everything that touches the file system for a model goes through here, so that the
guarantees hold everywhere: a bad file is one clear error, the input is never written,
and an output is either complete or absent.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from onnxslim.errors import InputError

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the edge.
PROTO_LIMIT = 2**31 - 2**26
# Tensors at least this large go to the data file when a model is saved with external data.
EXTERNAL_THRESHOLD = 1024


@dataclass
class Model:
    """A loaded model plus where it came from.

    ``external_data`` is true when the file kept tensors in side files: such a model is
    saved with external data again, whatever its size.
    """

    proto: ModelProto
    path: Path | None = None
    external_data: bool = False
    file_size: int = 0
    data_files: list[str] = field(default_factory=list)

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, in all subgraphs and functions."""

    def from_graph(g: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from g.initializer
        for si in g.sparse_initializer:
            yield si.values
            yield si.indices
        for node in g.node:
            yield from from_nodes([node])

    def from_nodes(nodes) -> Iterator[TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for g in attr.graphs:
                    yield from from_graph(g)

    yield from from_graph(model.graph)
    for fn in model.functions:
        yield from from_nodes(fn.node)


def _external_location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _safe_data_path(base_dir: Path, location: str, tensor_name: str) -> Path:
    """Resolve an external-data location, refusing anything that leaves the model's folder."""
    if not location:
        raise InputError(f"tensor '{tensor_name}' is marked external but has no data location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"external data location '{location}' of tensor '{tensor_name}' is an absolute path; "
                         "only files inside the model's folder are read")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise InputError(f"external data location '{location}' of tensor '{tensor_name}' leaves the model's folder")
    base_real = base_dir.resolve()
    target = (base_dir / location).resolve()
    if base_real != target and base_real not in target.parents:
        raise InputError(f"external data location '{location}' of tensor '{tensor_name}' resolves outside "
                         "the model's folder (symlink)")
    if not target.is_file():
        raise InputError(f"external data file '{location}' of tensor '{tensor_name}' is missing")
    return target


def check_external_locations(model: ModelProto, base_dir: Path) -> list[str]:
    """Validate every external-data location before any data file is opened; return the files used."""
    files: list[str] = []
    for t in iter_tensors(model):
        loc = _external_location(t)
        if loc is None:
            continue
        path = _safe_data_path(base_dir, loc, t.name)
        size = path.stat().st_size
        info = {e.key: e.value for e in t.external_data}
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise InputError(f"tensor '{t.name}' has a malformed external data offset/length") from None
        if offset < 0 or (length is not None and (length < 0 or offset + length > size)):
            raise InputError(f"tensor '{t.name}' points past the end of external data file '{loc}'")
        if loc not in files:
            files.append(loc)
    return files


def _parse(data: bytes, what: str) -> ModelProto:
    if not data:
        raise InputError(f"{what} is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"{what} is not an ONNX model (protobuf parse failed: {str(e).splitlines()[0] if str(e) else 'truncated or corrupt'})") from None
    # Random bytes and text sometimes parse as a (meaningless) protobuf: demand the basics.
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{what} is not an ONNX model (no graph or no IR version)")
    return model


def check_opsets(model: ModelProto, what: str = "model") -> None:
    """Refuse opsets newer than this onnx knows: their semantics are unknown to every pass."""
    supported = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > supported:
            raise InputError(f"{what} uses opset {imp.version}, newer than the installed onnx supports ({supported}); "
                             "upgrade onnx")
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(f"{what} has IR version {model.ir_version}, newer than the installed onnx supports "
                         f"({onnx.IR_VERSION}); upgrade onnx")
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import) and any(
        n.domain in ("", "ai.onnx") for n in model.graph.node
    ):
        raise InputError(f"{what} has no opset import for the default ONNX domain")


def check_model(model: ModelProto, what: str = "model", path: Path | None = None) -> None:
    """onnx.checker, reported as one line. Large models are checked from their file."""
    try:
        if path is not None and model.ByteSize() >= PROTO_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "invalid model")
        raise InputError(f"{what} fails onnx.checker: {first}") from None
    except (ValueError, RuntimeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"{what} fails onnx.checker: {first}") from None


def load_model(source: str | os.PathLike | ModelProto | Model, *, check: bool = True) -> Model:
    """Load a model from a path (or wrap a ModelProto), with every input check applied.

    Raises InputError with a one-line message for anything that is not a usable ONNX model.
    """
    if isinstance(source, Model):
        return source
    if isinstance(source, ModelProto):
        has_ext = any(_external_location(t) is not None for t in iter_tensors(source))
        if has_ext:
            raise InputError("in-memory model refers to external data; pass its path instead")
        check_opsets(source)
        if check:
            check_model(source)
        return Model(proto=source)

    path = Path(source)
    what = f"'{path}'"
    if not path.exists():
        raise InputError(f"{what}: no such file")
    if path.is_dir():
        raise InputError(f"{what} is a directory, not an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{what}: cannot read ({e.strerror})") from None
    model = _parse(data, what)
    file_size = len(data)
    del data
    check_opsets(model, what)
    files = check_external_locations(model, path.parent)
    if files:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{what}: cannot load external data ({e})") from None
        file_size += sum((path.parent / f).stat().st_size for f in files)
    if check:
        check_model(model, what, path if files else None)
    return Model(proto=model, path=path, external_data=bool(files), file_size=file_size, data_files=files)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name one file (also through symlinks and hard links)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.resolve() == pb.resolve():
            return True
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None) -> Path:
    """Refuse outputs we could not write completely, before any work is done."""
    out = Path(out)
    if inp is not None and same_file(out, inp):
        raise InputError(f"output '{out}' is the input file; refusing to overwrite the input")
    if out.is_dir():
        raise InputError(f"output '{out}' is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory '{parent}' is not writable")
    return out


def model_bytes(model: ModelProto) -> int:
    return model.ByteSize()


def _fsync_write(path: Path, chunks) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def save_model(model: ModelProto | Model, out: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write the model atomically; returns the path written.

    With external data, tensors go to ``<out name>.<content hash>.data`` beside the model: the
    name changes with the content, so a crash between writing the data and renaming the model
    never pairs an old model with new data, and the same model always gets the same bytes.
    The model proto is restored before returning (tensors moved to the file are put back).
    """
    src = model
    proto = model.proto if isinstance(model, Model) else model
    if external_data is None:
        external_data = (isinstance(src, Model) and src.external_data) or proto.ByteSize() >= PROTO_LIMIT
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    old_data = _referenced_data_files(out)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_tmp: Path | None = None
    moved: list[tuple[TensorProto, bytes]] = []
    try:
        data_name = None
        if external_data:
            data_tmp, data_name, moved = _write_external(proto, out, parent)
        _fsync_write(tmp, [proto.SerializeToString()])
        if data_tmp is not None and data_name is not None:
            os.replace(data_tmp, parent / data_name)
            data_tmp = None
        os.replace(tmp, out)
        try:
            dfd = os.open(parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
        for stale in old_data:
            if stale != data_name:
                try:
                    (parent / stale).unlink()
                except OSError:
                    pass
    except OSError as e:
        raise InputError(f"cannot write '{out}': {e.strerror or e}") from None
    finally:
        for t, raw in moved:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw
        for p in (tmp, data_tmp):
            if p is not None and p.exists():
                p.unlink()
    return out


def _write_external(proto: ModelProto, out: Path, parent: Path) -> tuple[Path, str, list[tuple[TensorProto, bytes]]]:
    """Move large tensors' bytes into a temporary data file; return it, its final name and what moved."""
    fd, data_tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".data.tmp", dir=parent)
    data_tmp = Path(data_tmp_name)
    moved: list[tuple[TensorProto, bytes]] = []
    h = hashlib.sha256()
    offset = 0
    with os.fdopen(fd, "wb") as f:
        for t in iter_tensors(proto):
            if t.data_location == TensorProto.EXTERNAL:
                continue
            if not t.HasField("raw_data"):
                if t.data_type == TensorProto.STRING or _approx_size(t) < EXTERNAL_THRESHOLD:
                    continue
                arr = onnx.numpy_helper.to_array(t)
                t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            raw = t.raw_data
            if len(raw) < EXTERNAL_THRESHOLD:
                continue
            pad = (-offset) % 64  # aligned offsets let onnxruntime mmap the data
            if pad:
                f.write(b"\0" * pad)
                h.update(b"\0" * pad)
                offset += pad
            f.write(raw)
            h.update(raw)
            moved.append((t, raw))
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", ""), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
        f.flush()
        os.fsync(f.fileno())
    data_name = f"{out.name}.{h.hexdigest()[:16]}.data"
    for t, _ in moved:
        t.external_data[0].value = data_name
    return data_tmp, data_name, moved


def _approx_size(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n * 4


def _referenced_data_files(out: Path) -> list[str]:
    """External data files the model currently at ``out`` uses (to remove them once replaced)."""
    if not out.is_file():
        return []
    try:
        m = onnx.load(str(out), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever is there, we only try to tidy up after it
        return []
    names = []
    for t in iter_tensors(m):
        loc = _external_location(t)
        if loc and "/" not in loc and "\\" not in loc and loc.startswith(out.name + ".") and loc not in names:
            names.append(loc)
    return names
