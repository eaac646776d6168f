"""Weights that stay on disk: large tensors are read lazily and streamed into the output at save time.

Why: a ModelProto holds every weight in memory, and each conversion around it (reading the file,
parsing, graphsurgeon export, serialization, onnxruntime) makes another copy, so a naive pipeline
peaks at 3-5x the model size. Instead, when a model is loaded from a file, each large tensor becomes
a *stub*: a TensorProto with the same name, type and dims but no data, marked EXTERNAL with a
location naming a byte range in an already-opened source file (the .onnx itself for embedded
weights, or its external-data file). Passes reach the values through graphsurgeon
(``onnxslim.graph.StoredValues``) only when they need them, memory-mapped and read-only; weights
nobody changed are never copied, and at save time their bytes are streamed from the source file.

A stub's location starts with a NUL byte. No real path contains one, so a stub can never be forged
by an input file (``model.check_external_locations`` refuses NUL) nor mistaken for a real
external-data reference: onnx and onnxruntime fail on it instead of opening some other file.
Stubs never leave the process: saving resolves them, and ``materialize`` turns them back into data.

Weights a pass rewrites (bn-fold scales every conv weight, fold makes new arrays) would otherwise all be
in memory at once, plus a protobuf copy of each at every graph<->proto conversion. While a run is
``spilling`` (the lossless pipeline), such large new arrays are written to one unnamed *spill file*
beside the output and replaced by stubs into it, exactly like weights loaded from the input: read back
memory-mapped when a pass wants them, streamed into the output at save time, never resident in bulk.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from onnxslim.protowalk import iter_tensors

MARKER = "\x00onnxslim:"
# Tensors at least this large are left on disk when a model is loaded lazily.
LAZY_THRESHOLD = 1024
_CHUNK = 8 << 20  # streaming copies go through a buffer of this size, never through the whole tensor
# New arrays at least this large go to the spill file while spilling (below it, memory is not where a
# model's size is, and each spilled tensor costs a write and a mapping).
SPILL_THRESHOLD = 64 << 10
# Mapped pages are dropped after every this many bytes spilled: a pass that reads each weight once and
# rewrites it (bn-fold) would otherwise end with every old weight resident as mapped pages.
_RELEASE_EVERY = 64 << 20
_SPILL_ALIGN = 4096  # spilled tensors start on a page: the views are aligned for any dtype


class WireError(Exception):
    """The file is not valid protobuf wire format (so it cannot be an ONNX model)."""


class _Unusual(Exception):
    """Valid protobuf that the lazy reader does not handle (e.g. a repeated graph field): parse normally."""


class _Source:
    """One opened file that stubs point into. Opened once, so later reads see the file that was checked."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        """Open ``path`` read-only, or adopt ``fd`` (a spill file this process writes; ``path`` only names it)."""
        self.path = path
        if fd is None:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
        self.fd = fd
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise OSError(f"'{path}' is not a regular file")
        self.size = st.st_size
        self._mm: mmap.mmap | None = None
        self._old: list[mmap.mmap] = []  # earlier, shorter mappings of a growing file that arrays may still view

    def view(self, offset: int, length: int) -> memoryview:
        """Zero-copy, read-only view of the bytes (memory-mapped)."""
        if length == 0:
            return memoryview(b"")
        if self._mm is None or offset + length > len(self._mm):
            if self._mm is not None:  # the file grew (spill): map it again; the old mapping goes when its views do
                self._old.append(self._mm)
                self._old = [mm for mm in self._old if not _closed(mm)]
            self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return memoryview(self._mm)[offset:offset + length]

    def append(self, data: memoryview) -> int:
        """Write ``data`` at the end of the file, page-aligned; return its offset (spill files only)."""
        offset = -(-self.size // _SPILL_ALIGN) * _SPILL_ALIGN
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:done + _CHUNK], offset + done)
        self.size = offset + len(data)
        return offset

    def copy_into(self, f: BinaryIO, offset: int, length: int, hasher=None) -> None:
        """Append the bytes to ``f`` (a FileWriter or BytesIO), hashing them on the way, a chunk at a time.

        The kernel copies (copy_file_range: no trip through this process) while the hash reads the
        mapping; each chunk's pages are dropped from the mapping afterwards, so a copy of any size
        leaves the resident set flat. Falls back to writing from the mapping where the call is missing.
        """
        view = self.view(offset, length)
        page = mmap.PAGESIZE
        done = 0
        while done < length:
            n = min(_CHUNK, length - done)
            piece = view[done:done + n]
            # Both release the GIL: the hash of a chunk runs beside the kernel's copy of it.
            hashed = _hash_pool().submit(hasher.update, piece) if hasher is not None and n >= 1 << 20 else None
            if hasher is not None and hashed is None:
                hasher.update(piece)
            _copy_range(self.fd, f, offset + done, n, piece)
            if hashed is not None:
                hashed.result()
            start = (offset + done) // page * page
            if hasattr(mmap, "MADV_DONTNEED"):
                self._mm.madvise(mmap.MADV_DONTNEED, start, offset + done + n - start)
            done += n

    def release_pages(self) -> None:
        """Drop this mapping's resident pages (they stay in the page cache; views re-fault on access)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mm in self._old + ([self._mm] if self._mm is not None else []):
                mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        for mm in self._old + ([self._mm] if self._mm is not None else []):
            try:
                mm.close()
            except BufferError:  # arrays still view it: the mapping goes when they do
                pass
        self._mm, self._old = None, []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _closed(mm: mmap.mmap) -> bool:
    """Close ``mm`` if no array views it any more; True when it is closed."""
    try:
        mm.close()
        return True
    except BufferError:
        return False


_copy_file_range_works = hasattr(os, "copy_file_range")
_POOL = []


def _hash_pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="onnxslim-hash"))
    return _POOL[0]


class FileWriter:
    """An unbuffered file whose write() always writes everything (raw writes may be short)."""

    def __init__(self, raw) -> None:
        self.raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self.raw.write(view[done:])
        return done

    def fileno(self) -> int:
        return self.raw.fileno()


def _copy_range(src_fd: int, f: BinaryIO, src_offset: int, n: int, piece: memoryview) -> None:
    global _copy_file_range_works
    try:
        dst = f.fileno()
    except (OSError, ValueError):  # e.g. BytesIO
        f.write(piece)
        return
    if _copy_file_range_works:
        copied = 0
        try:
            while copied < n:
                k = os.copy_file_range(src_fd, dst, n - copied, src_offset + copied)
                if k == 0:
                    raise OSError(f"source ended {n - copied} bytes early (was it truncated while in use?)")
                copied += k
            return
        except OSError as e:
            if copied or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            _copy_file_range_works = False  # not on this system or file system: plain writes from now on
    f.write(piece)


class WeightStore:
    """The source files of one loaded model. Stubs name the store by id, so they survive proto copies
    (shape inference, CopyFrom) and still resolve."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.sources: list[_Source] = []
        _STORES[self.id] = self

    def add_file(self, path: Path) -> int:
        for i, s in enumerate(self.sources):
            if s.path == path:
                return i
        self.sources.append(_Source(path))
        return len(self.sources) - 1

    def make_stub(self, t: TensorProto, source: int, offset: int, length: int) -> None:
        """Turn ``t`` (already without data) into a stub for ``length`` bytes at ``offset`` of a source."""
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", f"{MARKER}{self.id}:{source}"), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v

    def owns(self, t: TensorProto) -> bool:
        return is_stub(t) and t.external_data[0].value.startswith(f"{MARKER}{self.id}:")

    def close(self) -> None:
        for s in self.sources:
            s.close()
        self.sources = []
        _STORES.pop(self.id, None)


_STORES: dict[int, WeightStore] = {}


def _unnamed_file(folder: Path) -> int:
    """A read-write file in ``folder`` that has no name: nothing is left behind, even after SIGKILL."""
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_TMPFILE"):
        try:
            return os.open(folder, os.O_TMPFILE | flags, 0o600)
        except OSError:  # file system without O_TMPFILE: a named file, unlinked at once
            pass
    fd, name = tempfile.mkstemp(prefix=".onnxslim-spill-", dir=folder)
    os.unlink(name)
    return fd


class SpillStore(WeightStore):
    """One spill file: large arrays made by passes, kept as stubs into it (see the module doc)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        try:
            fd = _unnamed_file(folder)
        except OSError:  # e.g. no output folder given and the temporary folder is odd: the system's
            folder = Path(tempfile.gettempdir())
            fd = _unnamed_file(folder)
        self.sources.append(_Source(folder / "<onnxslim spill file>", fd))
        self.bytes = 0  # spilled so far
        self._since_release = 0

    def spill(self, arr: np.ndarray, name: str) -> TensorProto | None:
        """A stub holding ``arr``'s values, or None when ``arr`` stays in memory (small or exotic type)."""
        code = _CODES.get(arr.dtype)
        if code is None or sys.byteorder != "little" or arr.nbytes < SPILL_THRESHOLD:
            return None
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        offset = self.sources[0].append(memoryview(flat))
        t = TensorProto(name=name, data_type=code, dims=arr.shape)
        self.make_stub(t, 0, offset, arr.nbytes)
        self.bytes += arr.nbytes
        self._since_release += arr.nbytes
        if self._since_release >= _RELEASE_EVERY:
            release_pages()
            self._since_release = 0
        return t


_SPILL: list[SpillStore] = []  # the active spill store is the last one


@contextlib.contextmanager
def spilling(folder: str | os.PathLike | None = None) -> Iterator[SpillStore]:
    """While the block runs, ``spill`` puts large new arrays into an unnamed file in ``folder`` (default:
    the temporary folder). Stubs into it are valid until the block ends: save or materialize before."""
    store = SpillStore(Path(folder) if folder is not None else Path(tempfile.gettempdir()))
    _SPILL.append(store)
    try:
        yield store
    finally:
        _SPILL.remove(store)
        store.close()


def spill(arr: np.ndarray, name: str) -> TensorProto | None:
    """A stub for ``arr`` in the active spill file, or None (not spilling, small, or an exotic dtype)."""
    return _SPILL[-1].spill(arr, name) if _SPILL else None


def spill_active() -> bool:
    return bool(_SPILL)


def release_pages() -> None:
    """Drop the resident pages of every mapped weight (memory-mapped weights read by passes count as
    this process's memory until then; the data stays in the page cache)."""
    for store in list(_STORES.values()):
        for src in store.sources:
            src.release_pages()


def is_stub(t: TensorProto) -> bool:
    return (t.data_location == TensorProto.EXTERNAL and len(t.external_data) > 0
            and t.external_data[0].key == "location" and t.external_data[0].value.startswith(MARKER))


def _ref(t: TensorProto) -> tuple[_Source, int, int]:
    info = {e.key: e.value for e in t.external_data}
    store_id, source = info["location"][len(MARKER):].split(":")
    store = _STORES.get(int(store_id))
    if store is None or not store.sources:
        raise RuntimeError(f"weights of tensor '{t.name}' were released (the model was closed)")
    return store.sources[int(source)], int(info["offset"]), int(info["length"])


def stub_nbytes(t: TensorProto) -> int:
    return _ref(t)[2]


def stub_view(t: TensorProto) -> memoryview:
    src, offset, length = _ref(t)
    return src.view(offset, length)


def copy_stub(t: TensorProto, f: BinaryIO, hasher=None) -> None:
    """Append the stub's bytes to ``f`` (a FileWriter or BytesIO) without holding them in memory."""
    src, offset, length = _ref(t)
    src.copy_into(f, offset, length, hasher)


# Element types whose raw data numpy can view directly (little-endian, fixed size).
_DIRECT = {
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
    TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.UINT32: np.uint32,
    TensorProto.INT64: np.int64, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_,
    TensorProto.COMPLEX64: np.complex64, TensorProto.COMPLEX128: np.complex128,
}
_CODES = {np.dtype(v): k for k, v in _DIRECT.items()}


def stub_array(t: TensorProto) -> np.ndarray:
    """The stub's values: a read-only memory-mapped view for common types, else a decoded copy."""
    dtype = _DIRECT.get(t.data_type)
    if dtype is not None and sys.byteorder == "little":
        view = stub_view(t)
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        return np.frombuffer(view, dtype=dtype, count=count).reshape(tuple(t.dims))
    full = TensorProto()
    full.CopyFrom(t)
    materialize(full)
    return onnx.numpy_helper.to_array(full)


def materialize(t: TensorProto) -> None:
    """Put the stub's bytes into ``t`` itself (it becomes an ordinary tensor with raw_data)."""
    data = bytes(stub_view(t))
    del t.external_data[:]
    t.ClearField("data_location")
    t.raw_data = data


def iter_stubs(model: ModelProto) -> Iterator[TensorProto]:

    return (t for t in iter_tensors(model) if is_stub(t))


def has_stubs(model: ModelProto) -> bool:
    return next(iter_stubs(model), None) is not None


def logical_size(model: ModelProto) -> int:
    """Serialized size the model would have with every stub's data inside it."""
    return model.ByteSize() + sum(stub_nbytes(t) for t in iter_stubs(model))


def materialize_all(model: ModelProto) -> ModelProto:
    for t in list(iter_stubs(model)):
        materialize(t)
    return model


# ---------------------------------------------------------------------------------------------
# Reading: find the large raw_data fields in the file's wire format without parsing them.
#
# A ModelProto's graph is field 7; a GraphProto's initializers are field 5; a TensorProto's bytes
# are field 9 (raw_data). We walk those three levels by hand, copy everything except the large
# raw_data fields into a small buffer (fixing the two enclosing length prefixes), and parse that.
# Anything unusual falls back to an ordinary parse; anything malformed is refused.

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of one message's fields."""
    pos = start
    while pos < end:
        fstart = pos
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0 or num >= 2**29:
            raise WireError(f"invalid field number {num}")
        vstart = pos
        if wt == _WT_VARINT:
            _, pos = _varint(buf, pos, end)
        elif wt == _WT_I64:
            pos += 8
        elif wt == _WT_LEN:
            n, pos = _varint(buf, pos, end)
            vstart = pos
            pos += n
        elif wt == _WT_I32:
            pos += 4
        elif wt in (3, 4):
            raise _Unusual("group")
        else:
            raise WireError(f"invalid wire type {wt}")
        if pos > end:
            raise WireError("truncated")
        yield num, wt, fstart, vstart, pos


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(num: int, wt: int = _WT_LEN) -> bytes:
    return encode_varint((num << 3) | wt)


def _raw_field(buf, start: int, end: int) -> tuple[int, int, int] | None:
    """(field start, data start, data end) of a tensor's raw_data field, if it has exactly one."""
    found = None
    for num, wt, fs, vs, ve in _fields(buf, start, end):
        if num == 9:
            if found is not None or wt != _WT_LEN:
                raise _Unusual("raw_data given twice")
            found = (fs, vs, ve)
    return found


def read_lazily(path: Path, store: WeightStore, threshold: int = LAZY_THRESHOLD) -> ModelProto | None:
    """Parse ``path`` leaving large top-level initializers' bytes in the file (as stubs).

    Returns None when the file has a shape this reader does not handle (the caller parses it
    normally); raises WireError when the file is not valid protobuf at all.
    """
    source = store.add_file(path)
    src = store.sources[source]
    if src.size == 0:
        return None
    buf = mmap.mmap(src.fd, 0, access=mmap.ACCESS_READ)
    try:
        return _read(buf, src.size, store, source, threshold)
    except _Unusual:
        return None
    finally:
        buf.close()


def _read(buf: mmap.mmap, size: int, store: WeightStore, source: int, threshold: int) -> ModelProto:
    graph = None
    for num, wt, fs, vs, ve in _fields(buf, 0, size):
        if num == 7:
            if graph is not None or wt != _WT_LEN:
                raise _Unusual("graph field given twice")  # protobuf merges them; let it
            graph = (fs, vs, ve)
    if graph is None:
        raise _Unusual("no graph")
    g_fs, g_vs, g_ve = graph
    pieces: list[bytes] = []
    run = g_vs  # start of the bytes copied verbatim since the last stripped tensor
    stripped: list[tuple[int, int, int]] = []  # (initializer index, data offset in file, length)
    index = 0
    for num, wt, fs, vs, ve in _fields(buf, g_vs, g_ve):
        if num != 5 or wt != _WT_LEN:
            continue
        raw = _raw_field(buf, vs, ve)
        if raw is not None and raw[2] - raw[1] >= threshold:
            r_fs, r_vs, r_ve = raw
            tensor = buf[vs:r_fs] + buf[r_ve:ve]
            pieces += [buf[run:fs], _key(5), encode_varint(len(tensor)), tensor]
            run = ve
            stripped.append((index, r_vs, r_ve - r_vs))
        index += 1
    if not stripped:
        raise _Unusual("nothing to leave on disk")
    pieces.append(buf[run:g_ve])
    graph_bytes = b"".join(pieces)
    small = b"".join([buf[0:g_fs], _key(7), encode_varint(len(graph_bytes)), graph_bytes, buf[g_ve:size]])
    model = ModelProto()
    model.ParseFromString(small)  # DecodeError propagates: the caller reports it
    if has_stubs(model):
        raise _Unusual("forged stub")  # parsed normally, its location is then refused
    for index, offset, length in stripped:
        t = model.graph.initializer[index]
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data) or _typed_fields(t):
            raise _Unusual("tensor with raw_data and other data")  # invalid; the checker will say so
        store.make_stub(t, source, offset, length)
    return model


def _typed_fields(t: TensorProto) -> bool:
    return bool(len(t.float_data) or len(t.int32_data) or len(t.string_data) or len(t.int64_data)
                or len(t.double_data) or len(t.uint64_data))


# ---------------------------------------------------------------------------------------------
# Writing an embedded model whose initializers are stubs, without ever holding their bytes.
#
# Protobuf serializes known fields in field-number order, so the file is: the model's fields
# before the graph, the graph (its fields before initializers, each initializer with its raw_data
# streamed in, the fields after), the model's fields after the graph. The bytes equal what
# SerializeToString() would produce for the materialized model (tests/test_io.py checks).

def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)
    return rep if rep is not None else fd.label == fd.LABEL_REPEATED


def _partial(msg, keep) -> bytes:
    """Serialization of only the fields of ``msg`` whose number passes ``keep``."""
    part = type(msg)()
    for fd, value in msg.ListFields():
        if not keep(fd.number):
            continue
        if _is_repeated(fd):
            getattr(part, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(part, fd.name).CopyFrom(value)
        else:
            setattr(part, fd.name, value)
    return part.SerializeToString()


def _has_unknown(msg) -> bool:
    try:
        from google.protobuf import unknown_fields

        return len(unknown_fields.UnknownFieldSet(msg)) > 0
    except Exception:  # noqa: BLE001 - cannot tell: take the safe path
        return True


def write_embedded(model: ModelProto, f: BinaryIO) -> None:
    """Serialize ``model`` to ``f`` with every stub's bytes inside, streaming them from their sources.

    ``f`` must be a FileWriter (unbuffered) or a BytesIO: stub bytes are copied by the kernel straight
    into its file descriptor."""
    graph = model.graph

    top = [t for t in graph.initializer if is_stub(t)]
    # iter_tensors yields the top-level initializers first: everything after them is nested.
    nested = [t for t in itertools.islice(iter_tensors(model), len(graph.initializer), None) if is_stub(t)]
    if not top or _has_unknown(model) or _has_unknown(graph) or any(_has_unknown(t) for t in top):
        # Rare shapes: materialize just for the write (these are small or unusual models).
        saved = [(t, list((e.key, e.value) for e in t.external_data)) for t in iter_stubs(model)]
        try:
            materialize_all(model)
            f.write(model.SerializeToString())
        finally:
            _restore(saved)
        return
    saved = [(t, list((e.key, e.value) for e in t.external_data)) for t in nested]
    try:
        for t in nested:  # stubs inside subgraphs/attributes: rare and usually small
            materialize(t)
        _write_streaming(model, f)
    finally:
        _restore(saved)


def _restore(saved: list[tuple[TensorProto, list[tuple[str, str]]]]) -> None:
    for t, entries in saved:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in entries:
            e = t.external_data.add()
            e.key, e.value = k, v


def _write_streaming(model: ModelProto, f: BinaryIO) -> None:
    graph = model.graph
    plans = []  # per initializer: (serialized head, data length or None, tail, total body length)
    for t in graph.initializer:
        if is_stub(t):
            n = stub_nbytes(t)
            head = _partial(t, lambda k: k < 9)
            tail = _partial(t, lambda k: k > 9 and k not in (13, 14))  # external_data, data_location dropped
            body = len(head) + len(_key(9)) + len(encode_varint(n)) + n + len(tail)
            plans.append((t, head, n, tail, body))
        else:
            plans.append((t, None, None, None, t.ByteSize()))
    g_head = _partial(graph, lambda k: k < 5)
    g_tail = _partial(graph, lambda k: k > 5)
    g_len = len(g_head) + len(g_tail) + sum(len(_key(5)) + len(encode_varint(p[4])) + p[4] for p in plans)
    f.write(_partial(model, lambda k: k < 7))
    f.write(_key(7) + encode_varint(g_len) + g_head)
    for t, head, n, tail, body in plans:
        f.write(_key(5) + encode_varint(body))
        if head is None:
            f.write(t.SerializeToString())
            continue
        f.write(head + _key(9) + encode_varint(n))
        copy_stub(t, f)
        f.write(tail)
    f.write(g_tail)
    f.write(_partial(model, lambda k: k > 7))
