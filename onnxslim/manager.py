"""Pass, PassResult, the registry, pipeline specs and the PassManager.

A pass owns one transformation. The manager owns everything around it: order, repetition
of lossless passes to a fixed point, timing, per-pass statistics, and (on request)
verification after every pass that names the first pass that changed the outputs.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxslim.errors import InputError, PassError, SlimError
from onnxslim.graph import iter_graphs, to_gs, to_proto, toposort
from onnxslim.model import Model

# Presets expand to pass names. Order matters only for speed: the lossless group is
# repeated until nothing changes, so each pass gets to see what the others exposed.
# Shapes first (fold and dce prove more with them), then fold (constants), inline-if (conditions
# known now), dce (what folding and inlining left dead or made a no-op), bn-fold (sees clean
# Conv->BN chains), cse last.
PRESETS: dict[str, list[str]] = {
    "lossless": ["shape-inference", "fold", "inline-if", "dce", "bn-fold", "cse"],
}
MAX_ROUNDS = 5


@dataclass
class PassResult:
    """What a pass did. ``model`` is set by model-level passes that build a new ModelProto."""

    changed: bool
    stats: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: ModelProto | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name``, ``description``, ``lossless`` and implement ``run``.

    ``level = "graph"``: ``run(graph: gs.Graph, ctx)`` edits the graphsurgeon graph in place.
    ``level = "model"``: ``run(model: ModelProto, ctx)`` may edit in place or return a new model
    in ``PassResult.model``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    level: ClassVar[str] = "graph"

    def run(self, target: Any, ctx: "Context") -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` in pipeline specs."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


_loaded = False


def load_passes() -> dict[str, type[Pass]]:
    """Import every module of onnxslim.passes so that their @register decorators run."""
    global _loaded
    if not _loaded:
        import onnxslim.passes as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"onnxslim.passes.{info.name}")
        _loaded = True
    return REGISTRY


def parse_pipeline(spec: str | list[str] | None) -> list[str]:
    """``"lossless,prune"`` -> ``["dce", ..., "prune"]``; unknown names are an InputError."""
    registry = load_passes()
    if spec is None:
        spec = "lossless"
    items = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",")]
    names: list[str] = []
    for item in items:
        if not item:
            continue
        if item in PRESETS:
            names.extend(PRESETS[item])
        elif item in registry:
            names.append(item)
        else:
            known = ", ".join(sorted(list(registry) + list(PRESETS)))
            raise InputError(f"unknown pass '{item}' (known: {known})")
    if not names:
        raise InputError("the pipeline is empty")
    return names


@dataclass
class Context:
    """The run's shared state. Passes read it; they never reach into each other."""

    original: Model | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] | None = None  # validation inputs, built once
    labels: np.ndarray | None = None  # class ids of ``inputs`` when known (accuracy gate)
    progress: Callable[[str], None] = lambda msg: None
    warnings: list[str] = field(default_factory=list)
    # A lossy pass that misses its own gate (e.g. quantization slower than --min-speedup) says so here;
    # the API then writes nothing unless --force.
    gate_failures: list[str] = field(default_factory=list)
    # Per-pass report sections (e.g. report.extra["prune"] = per-group channel counts).
    report_extra: dict[str, Any] = field(default_factory=dict)
    _calibration: Any = None

    def option(self, key: str, default: Any = None) -> Any:
        v = self.options.get(key)
        return default if v is None else v

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def calibration(self, model: ModelProto | None = None, required: bool = False):
        """Calibration data from ``--calib`` (loaded once, checked against the model's inputs)."""
        if self._calibration is None and self.options.get("calib"):
            from onnxslim.calibration import load_calibration

            self._calibration = load_calibration(
                self.options["calib"],
                model if model is not None else self.original.proto,
                size=self.options.get("calib_size"),
                options=self.options,
                input_shapes=self.input_shapes,
            )
            self.warnings.extend(self._calibration.warnings)  # e.g. 'random' data: accuracy not measured
        if self._calibration is None and required:
            raise InputError("this pass needs calibration data: pass --calib FILE.npz (or a folder, or 'random')")
        return self._calibration


@dataclass
class PassRecord:
    name: str
    round: int
    seconds: float
    changed: bool
    stats: dict[str, float]
    notes: list[str]
    before: dict[str, int]
    after: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "round": self.round, "seconds": round(self.seconds, 4), "changed": self.changed,
            "stats": self.stats, "notes": self.notes, "before": self.before, "after": self.after,
            "details": self.details,
        }


def graph_stats(graph: gs.Graph) -> dict[str, int]:
    """Node, initializer and weight-byte counts, read from shapes only (no weight is loaded)."""
    nodes = 0
    consts: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        for n in g.nodes:
            for t in list(n.inputs) + list(n.outputs):
                if isinstance(t, gs.Constant):
                    consts[id(t)] = t
    nbytes = 0
    for c in consts.values():
        try:
            nbytes += int(np.prod(c.shape, dtype=np.int64)) * np.dtype(c.dtype).itemsize
        except TypeError:
            pass
    return {"nodes": nodes, "initializers": len(consts), "bytes": nbytes}


def proto_stats(model: ModelProto) -> dict[str, int]:
    from onnxslim.graph import node_count

    inits = len(model.graph.initializer)
    from onnxslim import weights

    # Weights left on disk (stubs) have no raw_data in the proto: count the bytes they stand for.
    nbytes = sum(weights.stub_nbytes(t) if weights.is_stub(t) else len(t.raw_data) for t in model.graph.initializer)
    return {"nodes": node_count(model), "initializers": inits, "bytes": nbytes}


class _Workspace:
    """Holds the model as a ModelProto or a gs.Graph and converts only when the next pass needs the other."""

    def __init__(self, proto: ModelProto) -> None:
        self._proto: ModelProto | None = proto
        self._graph: gs.Graph | None = None
        self.template = proto

    def graph(self) -> gs.Graph:
        if self._graph is None:
            self._graph = to_gs(self._proto)
            self._proto = None
        return self._graph

    def proto(self) -> ModelProto:
        if self._proto is None:
            g = self._graph
            toposort(g)
            self._proto = to_proto(g, self.template)
            self._graph = None
        return self._proto

    def set_proto(self, proto: ModelProto) -> None:
        self._proto, self._graph = proto, None
        self.template = proto  # a model-level pass may change opsets (e.g. quantization upgrades to 13)

    def stats(self) -> dict[str, int]:
        return graph_stats(self._graph) if self._graph is not None else proto_stats(self._proto)


class PassManager:
    """Runs a pipeline of pass names over a model."""

    def __init__(self, names: list[str], *, max_rounds: int = MAX_ROUNDS,
                 verify: Callable[[ModelProto, str], None] | None = None,
                 on_stage: Callable[[ModelProto, str], None] | None = None) -> None:
        registry = load_passes()
        self.passes = [registry[n]() for n in names]
        self.max_rounds = max_rounds
        self.verify = verify  # called after each pass that changed the model (check-each-pass)
        self.on_stage = on_stage  # called after each lossy pass: per-stage metrics for the report
        self.records: list[PassRecord] = []

    def _groups(self) -> list[list[Pass]]:
        """Consecutive lossless passes form a group repeated to a fixed point; lossy passes run once."""
        groups: list[list[Pass]] = []
        for p in self.passes:
            if p.lossless and groups and groups[-1][0].lossless:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups

    def run(self, model: ModelProto, ctx: Context) -> ModelProto:
        ws = _Workspace(model)
        done: list[str] = []
        for group in self._groups():
            rounds = self.max_rounds if group[0].lossless else 1
            for rnd in range(1, rounds + 1):
                any_changed = False
                for p in group:
                    ctx.progress(f"{p.name} (round {rnd})" if rounds > 1 else p.name)
                    rec = self._run_one(p, ws, ctx, rnd, done)
                    done.append(p.name)
                    any_changed |= rec.changed
                if not any_changed:
                    break
        return ws.proto()

    def _run_one(self, p: Pass, ws: _Workspace, ctx: Context, rnd: int, done: list[str]) -> PassRecord:
        before = ws.stats()
        t0 = time.perf_counter()
        try:
            if p.level == "graph":
                result = p.run(ws.graph(), ctx)
            else:
                proto = ws.proto()
                result = p.run(proto, ctx)
                ws.set_proto(result.model if result.model is not None else proto)
        except SlimError:
            raise
        except Exception as e:  # a bug in a pass: name it and what ran before
            after_list = ", ".join(done[-8:]) or "nothing"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PassError(f"pass '{p.name}' failed ({type(e).__name__}: {msg}); passes before it: {after_list}") from e
        seconds = time.perf_counter() - t0
        rec = PassRecord(p.name, rnd, seconds, bool(result.changed), dict(result.stats), list(result.notes),
                         before, ws.stats(), dict(result.details))
        self.records.append(rec)
        if result.changed and self.verify is not None:
            self.verify(ws.proto(), p.name)
        if not p.lossless and self.on_stage is not None:
            self.on_stage(ws.proto(), p.name)
        return rec


def describe_passes() -> list[dict[str, Any]]:
    return [{"name": c.name, "description": c.description, "lossless": c.lossless}
            for c in sorted(load_passes().values(), key=lambda c: (not c.lossless, c.name))]
