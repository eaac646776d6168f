"""Model I/O: safe loading (external data confined to the model's folder), atomic saving.

Everything that touches the file system for a model goes through here, so that the
guarantees hold everywhere: a bad file is one clear error, the input is never written,
no file outside the model's folder is ever opened, and an output is either complete or absent.

Large models: ``load_model(path, lazy=True)`` leaves large weights on disk (see onnxslim.weights);
saving streams them from there, so memory stays near one copy of the model or below.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from onnxslim import weights
from onnxslim.errors import InputError
from onnxslim.protowalk import iter_tensors  # noqa: F401 - re-exported: callers import it from here

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the edge.
PROTO_LIMIT = 2**31 - 2**26
# Tensors at least this large go to the data file when a model is saved with external data.
EXTERNAL_THRESHOLD = 1024
# Offsets in data files are multiples of this, so onnxruntime can memory-map the tensors.
ALIGN = 4096


@dataclass
class Model:
    """A loaded model plus where it came from.

    ``external_data`` is true when the file kept tensors in side files: such a model is
    saved with external data again, whatever its size. ``store`` is set when large weights were
    left on disk (lazy loading): ``proto`` then holds stubs for them, and ``close()`` releases the files.
    """

    proto: ModelProto
    path: Path | None = None
    external_data: bool = False
    file_size: int = 0
    data_files: list[str] = field(default_factory=list)
    store: weights.WeightStore | None = None

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None

    def data_paths(self) -> list[Path]:
        return [self.path.parent / f for f in self.data_files] if self.path else []

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _external_location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


# ---------------------------------------------------------------------------------------------
# Loading

def _safe_data_path(base_dir: Path, location: str, tensor_name: str) -> Path:
    """Resolve an external-data location, refusing anything that leaves the model's folder.

    Only path strings and metadata (lstat/stat) are looked at here: no file is opened, so a
    hostile location (a FIFO, a device, a file elsewhere) can neither block nor leak.
    """
    if not location:
        raise InputError(f"tensor '{tensor_name}' is marked external but has no data location")
    if "\0" in location:
        raise InputError(f"external data location of tensor '{tensor_name}' contains a NUL character")
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
    try:
        st = target.stat()
    except OSError:
        raise InputError(f"external data file '{location}' of tensor '{tensor_name}' is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"external data '{location}' of tensor '{tensor_name}' is not a regular file")
    return target


def check_external_locations(model: ModelProto, base_dir: Path,
                              own: weights.WeightStore | None = None) -> dict[str, Path]:
    """Validate every external-data location before any data file is opened; return location -> file.

    ``own``: the store whose stubs this model legitimately holds (made while reading it); any other
    location with a NUL in it is refused like every unsafe path."""
    files: dict[str, Path] = {}
    for t in iter_tensors(model):
        loc = _external_location(t)
        if loc is None or (own is not None and own.owns(t)):
            continue
        path = files.get(loc) or _safe_data_path(base_dir, loc, t.name)
        size = path.stat().st_size
        info = {e.key: e.value for e in t.external_data}
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise InputError(f"tensor '{t.name}' has a malformed external data offset/length") from None
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise InputError(f"tensor '{t.name}' points past the end of external data file '{loc}'")
        files[loc] = path
    return files


def _first_line(e: BaseException, default: str) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), default)


def _require_basics(model: ModelProto, what: str) -> None:
    # Random bytes and text sometimes parse as a (meaningless) protobuf: demand the basics.
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{what} is not an ONNX model (no graph or no IR version)")


def _parse(data: bytes, what: str) -> ModelProto:
    if not data:
        raise InputError(f"{what} is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"{what} is not an ONNX model (protobuf parse failed: "
                         f"{_first_line(e, 'truncated or corrupt')})") from None
    _require_basics(model, what)
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


_SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4}
for _name, _bits in (("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(TensorProto, _name):
        _SUB_BYTE_BITS[getattr(TensorProto, _name)] = _bits


def tensor_nbytes(t: TensorProto) -> int | None:
    """Bytes of raw data the tensor's dims and type call for (None for strings and unknown types)."""
    if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    n = 1
    for d in t.dims:
        n *= d
    bits = _SUB_BYTE_BITS.get(t.data_type)
    if bits is not None:
        return (n * bits + 7) // 8
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _check_tensor_sizes(model: ModelProto, what: str) -> None:
    """Data that disagrees with its dims is refused here, for stubs too (the checker never sees their data)."""
    for t in iter_tensors(model):
        if any(d < 0 for d in t.dims):
            raise InputError(f"{what} fails onnx.checker: tensor '{t.name}' has a negative dimension {list(t.dims)}")
        if weights.is_stub(t):
            have = weights.stub_nbytes(t)
        elif t.data_location == TensorProto.DEFAULT and t.HasField("raw_data"):
            have = len(t.raw_data)
        else:
            continue
        need = tensor_nbytes(t)
        if need is None:  # the checker's rule, which it cannot apply to stubs
            kind = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
            raise InputError(f"{what} fails onnx.checker: tensor '{t.name}' of type {kind} cannot hold raw data")
        if have != need:  # the checker only refuses too little; onnx shape inference and numpy refuse any mismatch
            raise InputError(f"{what} fails onnx.checker: tensor '{t.name}' has {have} bytes of data but its "
                             f"shape {list(t.dims)} and type need {need}")


def _checker_view(model: ModelProto) -> ModelProto:
    """A copy onnx.checker can take: stubs have no data it could check.

    Top-level initializers that are stubs become graph inputs of the same type and shape (the checker
    then checks everything that reads them); nested stubs (rare) get their data.
    """
    view = ModelProto()
    view.CopyFrom(model)
    g = view.graph
    inputs = {v.name for v in g.input}
    keep = []
    for t in g.initializer:
        if weights.is_stub(t):
            if t.name not in inputs:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    weights.materialize_all(view)
    return view


def check_model(model: ModelProto, what: str = "model", path: Path | None = None) -> None:
    """onnx.checker, reported as one line. Large in-memory models are checked from their file."""
    if not len(model.graph.output):
        raise InputError(f"{what} has no graph outputs: it computes nothing")
    _check_tensor_sizes(model, what)
    try:
        if weights.has_stubs(model):
            onnx.checker.check_model(_checker_view(model))
        elif path is not None and model.ByteSize() >= PROTO_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InputError(f"{what} fails onnx.checker: {_first_line(e, 'invalid model')}") from None
    except (ValueError, RuntimeError, TypeError) as e:
        raise InputError(f"{what} fails onnx.checker: {_first_line(e, type(e).__name__)}") from None


def load_model(source: str | os.PathLike | ModelProto | Model, *, check: bool = True, lazy: bool = False) -> Model:
    """Load a model from a path (or wrap a ModelProto), with every input check applied.

    ``lazy``: leave large weights on disk as stubs (see onnxslim.weights); the caller must be ready
    for stubs (graph passes see them as lazy constants) and should ``close()`` the Model when done.
    Raises InputError with a one-line message for anything that is not a usable ONNX model.
    """
    if isinstance(source, Model):
        return source
    if isinstance(source, ModelProto):
        if any(_external_location(t) is not None for t in iter_tensors(source)):
            raise InputError("in-memory model refers to external data; pass its path instead")
        check_opsets(source)
        if check:
            check_model(source)
        return Model(proto=source)

    path = Path(source)
    what = f"'{path}'"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except OSError as e:
        raise InputError(f"{what}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} is a directory, not an .onnx file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} is not a regular file")  # a FIFO or device would block or never end
    if st.st_size == 0:
        raise InputError(f"{what} is empty")
    store = weights.WeightStore() if lazy else None
    try:
        model = _read(path, what, store)
        check_opsets(model, what)
        files = check_external_locations(model, path.parent, store)
        if files:
            _attach_external(model, files, store, what, path)
        if check:
            check_model(model, what, path if files else None)
    except BaseException:
        if store is not None:
            store.close()
        raise
    file_size = st.st_size + sum(p.stat().st_size for p in set(files.values()))
    loaded = Model(proto=model, path=path, external_data=bool(files), file_size=file_size, data_files=list(files),
                   store=store)
    if store is not None:
        weakref.finalize(loaded, store.close)  # the files are released even if nobody calls close()
    return loaded


def _read(path: Path, what: str, store: weights.WeightStore | None) -> ModelProto:
    """Parse the file; with a store, large initializers stay on disk (and the file is never read whole)."""
    try:
        if store is not None:
            try:
                model = weights.read_lazily(path.resolve(), store)
            except weights.WireError as e:
                raise InputError(f"{what} is not an ONNX model (invalid protobuf: {e})") from None
            except (DecodeError, RuntimeError, ValueError) as e:
                raise InputError(f"{what} is not an ONNX model (protobuf parse failed: "
                                 f"{_first_line(e, 'truncated or corrupt')})") from None
            if model is not None:
                _require_basics(model, what)
                return model
        return _parse(path.read_bytes(), what)
    except OSError as e:
        raise InputError(f"{what}: cannot read ({e.strerror or e})") from None


def _attach_external(model: ModelProto, files: dict[str, Path], store: weights.WeightStore | None,
                     what: str, path: Path) -> None:
    """Make external tensors usable: stubs into the (already checked) data files, or their data loaded."""
    try:
        if store is None:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            return
        sources = {loc: store.add_file(p) for loc, p in files.items()}
        for t in iter_tensors(model):
            loc = _external_location(t)
            if loc is None or store.owns(t):
                continue
            info = {e.key: e.value for e in t.external_data}
            offset = int(info.get("offset", 0) or 0)
            src = store.sources[sources[loc]]
            length = int(info["length"]) if info.get("length") else src.size - offset
            store.make_stub(t, sources[loc], offset, length)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{what}: cannot load external data ({_first_line(e, type(e).__name__)})") from None


# ---------------------------------------------------------------------------------------------
# Output paths

def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name one file (also through symlinks and hard links)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.resolve() == pb.resolve():
            return True
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None,
                      data_files: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse outputs we could not write completely, or that would overwrite an input, before any work is done."""
    out = Path(out)
    if inp is not None and same_file(out, inp):
        raise InputError(f"output '{out}' is the input file; refusing to overwrite the input")
    for d in data_files:
        if same_file(out, d):
            raise InputError(f"output '{out}' is an external data file of the input; refusing to overwrite it")
    if out.is_dir():
        raise InputError(f"output '{out}' is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory '{parent}' is not writable")
    return out


def model_bytes(model: ModelProto) -> int:
    return weights.logical_size(model)


# ---------------------------------------------------------------------------------------------
# Saving: stage everything in a private folder beside OUT, then commit with renames.
#
# A staged model is complete and loadable where it lies (its data file sits beside it), so the
# final validation runs on exactly the bytes that will be committed, and nothing is written twice.
# Commit renames the data file (content-hashed name: never an old model paired with new data) and
# then the model over OUT; a SIGKILL at any moment leaves OUT absent or the previous complete
# output. Commits into one folder are serialized with a lock, so concurrent writers of the same
# OUT end with one complete model (and never delete each other's data).

_TMP_TAG = ".onnxslim-tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _fsync_write(path: Path, chunks) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on a folder (POSIX); a no-op where unsupported."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(parent: Path, out_name: str) -> None:
    """Staging folders of runs on this host that were killed: they hold nothing anyone can use."""
    pattern = re.compile(re.escape(f".{out_name}{_TMP_TAG}") + r"([0-9a-f]{8})-(\d+)-")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and m.group(1) == _HOST and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class StagedModel:
    """A complete model written to a private folder beside its destination, not yet visible at ``out``."""

    out: Path
    folder: Path
    data_name: str | None

    @property
    def path(self) -> Path:
        return self.folder / self.out.name

    def size(self) -> int:
        n = self.path.stat().st_size
        return n + ((self.folder / self.data_name).stat().st_size if self.data_name else 0)

    def commit(self, protect: Iterable[str | os.PathLike] = ()) -> Path:
        """Move the model to ``out``; remove data files only the replaced output used (never ``protect``)."""
        parent = self.out.parent if str(self.out.parent) else Path(".")
        try:
            with _dir_lock(parent):
                old = _referenced_data_files(self.out)
                if self.data_name:
                    os.replace(self.folder / self.data_name, parent / self.data_name)
                os.replace(self.path, self.out)
                _fsync_dir(parent)
                keep = {Path(p).resolve() for p in protect}
                for stale in old:
                    if stale != self.data_name and (parent / stale).resolve() not in keep:
                        with contextlib.suppress(OSError):
                            (parent / stale).unlink()
        except OSError as e:
            raise InputError(f"cannot write '{self.out}': {e.strerror or e}") from None
        finally:
            self.discard()
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stage_model(model: ModelProto | Model, out: str | os.PathLike, *, external_data: bool | None = None) -> StagedModel:
    """Write the model completely into a private folder beside ``out`` (see StagedModel).

    With external data, tensors go to ``<out name>.<content hash>.data``: the name changes with the
    content, so a crash between renames never pairs an old model with new data, and the same model
    always gets the same bytes. The proto is left as it was (stubs stay stubs).
    """
    proto = model.proto if isinstance(model, Model) else model
    if external_data is None:
        external_data = (isinstance(model, Model) and model.external_data) or weights.logical_size(proto) >= PROTO_LIMIT
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    _remove_stale_temps(parent, out.name)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{_HOST}-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise InputError(f"cannot write '{out}': {e.strerror or e}") from None
    staged = StagedModel(out, folder, None)
    try:
        if external_data:
            staged.data_name = _write_external(proto, out.name, folder)
        else:
            with open(staged.path, "wb", buffering=0) as raw:  # unbuffered: stub bytes are copied to its fd
                weights.write_embedded(proto, weights.FileWriter(raw))
                os.fsync(raw.fileno())
    except OSError as e:
        staged.discard()
        raise InputError(f"cannot write '{out}': {e.strerror or e}") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def save_model(model: ModelProto | Model, out: str | os.PathLike, *, external_data: bool | None = None,
               protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write the model atomically; returns the path written. ``protect``: files never to delete (the input's data)."""
    return stage_model(model, out, external_data=external_data).commit(protect)


def _write_external(proto: ModelProto, out_name: str, folder: Path) -> str:
    """Write ``<out_name>`` and its data file into ``folder``; return the data file's name.

    Tensors are pointed at the data file only while the model proto is serialized, then restored.
    """
    data_tmp = folder / "data.tmp"
    moved: list[tuple[TensorProto, bytes | list[tuple[str, str]]]] = []  # tensor, what to restore
    h = hashlib.sha256()
    offset = 0
    try:
        with open(data_tmp, "wb", buffering=0) as raw:  # unbuffered: stub bytes are copied to its fd
            f = weights.FileWriter(raw)
            for t in iter_tensors(proto):
                stub = weights.is_stub(t)
                if not stub:
                    if t.data_location == TensorProto.EXTERNAL:
                        continue
                    if not t.HasField("raw_data"):
                        if t.data_type == TensorProto.STRING or (tensor_nbytes(t) or 0) < EXTERNAL_THRESHOLD:
                            continue
                        arr = onnx.numpy_helper.to_array(t)
                        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
                    if len(t.raw_data) < EXTERNAL_THRESHOLD:
                        continue
                elif weights.stub_nbytes(t) < EXTERNAL_THRESHOLD:
                    moved.append((t, [(e.key, e.value) for e in t.external_data]))
                    weights.materialize(t)  # small: inline like any other small tensor
                    continue
                pad = (-offset) % ALIGN
                if pad:
                    f.write(b"\0" * pad)
                    h.update(b"\0" * pad)
                    offset += pad
                if stub:
                    length = weights.stub_nbytes(t)
                    weights.copy_stub(t, f, h)
                    moved.append((t, [(e.key, e.value) for e in t.external_data]))
                else:
                    data = t.raw_data
                    length = len(data)
                    f.write(data)
                    h.update(data)
                    moved.append((t, data))
                    t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", ""), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                offset += length
            os.fsync(raw.fileno())
        data_name = f"{out_name}.{h.hexdigest()[:16]}.data"
        for t, _ in moved:
            if t.data_location == TensorProto.EXTERNAL:
                t.external_data[0].value = data_name
        os.replace(data_tmp, folder / data_name)
        _fsync_write(folder / out_name, [proto.SerializeToString()])
        return data_name
    finally:
        for t, before in moved:
            t.ClearField("raw_data")
            del t.external_data[:]
            if isinstance(before, bytes):
                t.ClearField("data_location")
                t.raw_data = before
            else:
                t.data_location = TensorProto.EXTERNAL
                for k, v in before:
                    e = t.external_data.add()
                    e.key, e.value = k, v


def _referenced_data_files(out: Path) -> list[str]:
    """External data files the model currently at ``out`` uses (to remove them once replaced).

    Only names this module gives (``<out name>.<hash>.data`` beside it) are candidates."""
    if not out.is_file():
        return []
    store = weights.WeightStore()
    try:
        m = weights.read_lazily(out.resolve(), store)
        if m is None:
            if out.stat().st_size >= PROTO_LIMIT:
                return []
            m = onnx.load(str(out), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever is there, we only try to tidy up after it
        return []
    finally:
        store.close()
    pattern = re.compile(re.escape(out.name) + r"\.[0-9a-f]{16}\.data")
    names: list[str] = []
    for t in iter_tensors(m):
        loc = _external_location(t)
        if loc and pattern.fullmatch(loc) and loc not in names:
            names.append(loc)
    return names


@contextlib.contextmanager
def session_source(model: ModelProto) -> Iterator[ModelProto | Path]:
    """Something onnxruntime can load: the proto itself, or (stubs or > 2 GB) a temporary file."""
    if not weights.has_stubs(model) and model.ByteSize() < PROTO_LIMIT:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="onnxslim-") as d:
        staged = stage_model(model, Path(d) / "model.onnx")
        try:
            yield staged.path
        finally:
            staged.discard()
