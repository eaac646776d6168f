"""Pass, PassResult, the registry, pipeline specs and the PassManager.

A pass owns one transformation. The manager owns everything around it: order, repetition
of lossless passes to a fixed point, timing, per-pass statistics, and (on request)
verification after every pass that names the first pass that changed the outputs.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxslim import options as opts
from onnxslim.errors import InputError, PassError, SlimError
from onnxslim.graph import graph_and_bodies, to_gs, to_proto, toposort
from onnxslim.model import Model
from onnxslim.options import RunOptions
from onnxslim.protowalk import model_stats

# Presets expand to pass names. Order matters only for speed: the lossless group is
# repeated until nothing changes, so each pass gets to see what the others exposed.
# Shapes first (fold and dce prove more with them), then fold (constants), inline-if (conditions
# known now), dce (what folding and inlining left dead or made a no-op), bn-fold (sees clean
# Conv->BN chains), cse last.
PRESETS: dict[str, list[str]] = {
    "lossless": ["shape-inference", "fold", "shape-chain", "slice-merge", "unroll-loop", "inline-if", "dce", "fuse-layernorm", "fuse-gelu", "bn-fold", "cse"],
}
MAX_ROUNDS = 10  # shape-chain unlocks one Reshape per round on PP-OCR rec (fixed point at round 7)


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

    ``Options``: a frozen dataclass of the pass's settings (``onnxslim.options.option`` fields); the
    manager builds it from the user's values and hands it over as ``self.options``.

    ``level = "graph"``: ``run(graph: gs.Graph, ctx)`` edits the graphsurgeon graph in place.
    ``level = "model"``: ``run(model: ModelProto, ctx)`` returns a new model in ``PassResult.model``
    or edits the one it is given; either way the manager never hands it the model validation compares
    against (``ctx.original`` is a separate object, and the caller's ModelProto is copied first).

    Weights: in lossless pipelines large initializers are *stubs* (``onnxslim.weights``) whose bytes
    stay on disk; read a tensor's values through ``ctx.array(tensor)`` (or ``graph.const_value``), never
    through ``raw_data``. Lossy pipelines get every weight loaded.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    level: ClassVar[str] = "graph"
    # The pass changes only annotations (value_info), never nodes or weights. A round in which only such
    # passes changed something is a fixed point: every other pass already ran on the fresh annotations and
    # changed nothing. (graphsurgeon round trips rewrite value_info, so shape inference "changes" it again
    # every round; counting that ran silero VAD's preset to the round limit.)
    annotates_only: ClassVar[bool] = False
    Options: ClassVar[type | None] = None
    # ``PassResult.details`` of the pass's last run become the report section of this name.
    report_section: ClassVar[str | None] = None

    def __init__(self, options: Any = None) -> None:
        if options is None and self.Options is not None:
            options = self.Options()
        self.options = options

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


def option_owners() -> dict[str, list[str]]:
    """Option name -> the registered passes that declare it."""
    owners: dict[str, list[str]] = {}
    for name, cls in load_passes().items():
        for f in opts.fields_of(cls.Options) if cls.Options is not None else ():
            owners.setdefault(f.name, []).append(name)
    return owners


def resolve_options(names: list[str], values: dict[str, Any] | None) -> tuple[RunOptions, dict[str, Any]]:
    """Typed settings for a pipeline: the run-level ``RunOptions`` and one options object per pass name.

    Every key must be declared by ``RunOptions`` or by a pass in the pipeline: a misspelt key, or an
    option of a pass the pipeline does not run, is an InputError (it would otherwise be ignored silently)."""
    import difflib

    registry = load_passes()
    values = {k: v for k, v in (values or {}).items() if v is not None}
    owners = option_owners()
    run_fields = {f.name: f for f in opts.fields_of(RunOptions)}
    lossy = any(not registry[n].lossless for n in names)
    pipeline = ",".join(dict.fromkeys(names))
    for key in values:
        if key in run_fields:
            if key in opts.LOSSY_RUN_OPTIONS and not lossy:
                raise InputError(f"{opts.cli_flag(run_fields[key])} is for lossy passes, and the pipeline "
                                 f"({pipeline}) has none")
            continue
        if key in owners:
            if not any(n in owners[key] for n in names):
                flag = opts.cli_flag(next(f for f in opts.fields_of(registry[owners[key][0]].Options)
                                          if f.name == key))
                raise InputError(f"{flag} is an option of pass {' / '.join(repr(o) for o in owners[key])}, "
                                 f"which is not in the pipeline ({pipeline})")
            continue
        close = difflib.get_close_matches(key, list(run_fields) + list(owners), n=1)
        raise InputError(f"unknown option '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    per_pass = {n: opts.build(registry[n].Options, values) for n in dict.fromkeys(names)
                if registry[n].Options is not None}
    return opts.build(RunOptions, values), per_pass


@dataclass
class Context:
    """The run's shared state. Passes read it; they never reach into each other."""

    original: Model | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    run: RunOptions = field(default_factory=RunOptions)
    given: frozenset[str] = frozenset()  # option names the user set (vs. defaults)
    custom_op_library: str | None = None
    inputs: dict[str, np.ndarray] | None = None  # validation inputs, built once
    labels: np.ndarray | None = None  # class ids of ``inputs`` when known (accuracy gate)
    progress: Callable[[str], None] = lambda msg: None
    warnings: list[str] = field(default_factory=list)
    # A lossy pass that misses its own gate (e.g. quantization slower than --min-speedup) says so here;
    # the API then writes nothing unless --force.
    gate_failures: list[str] = field(default_factory=list)
    _calibration: Any = None
    _holdout: Any = None

    @staticmethod
    def array(tensor: Any) -> np.ndarray:
        """The values of an initializer (gs.Constant or TensorProto), loading a stub from disk if needed."""
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        from onnx import numpy_helper

        from onnxslim import weights

        return weights.stub_array(tensor) if weights.is_stub(tensor) else numpy_helper.to_array(tensor)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def calibration(self, model: ModelProto | None = None, required: bool = False):
        """Calibration data from ``--calib`` (loaded once, checked against the model's inputs)."""
        if self._calibration is None and self.run.calib:
            from onnxslim.calibration import load_calibration, split_holdout

            data = load_calibration(self.run.calib, model if model is not None else self.original.proto,
                                    settings=self.run, input_shapes=self.input_shapes)
            self.warnings.extend(data.warnings)  # e.g. 'random' data: accuracy not measured
            # The passes fit on one part; the gate measures on the part they never saw.
            self._calibration, self._holdout = split_holdout(data, self.run.calib_holdout)
            if self._holdout is None and data.measured and self.run.calib_holdout > 0:
                self.warn(f"calibration data: {data.size} sample(s) are too few to hold some out; the lossy gate "
                          "measures on the data the passes fitted (give --inputs for an independent check)")
        if self._calibration is None and required:
            raise InputError("this pass needs calibration data: pass --calib FILE.npz (or a folder, or 'random')")
        return self._calibration

    def holdout(self, model: ModelProto | None = None):
        """The held-out part of ``--calib`` (never given to a pass), or None."""
        self.calibration(model)
        return self._holdout


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
    dropped: str | None = None  # a lossy stage whose result failed its gate and was undone: why

    def to_dict(self) -> dict[str, Any]:
        # details are not repeated here: they are the pass's report section (Report.extra)
        d = {
            "name": self.name, "round": self.round, "seconds": round(self.seconds, 4), "changed": self.changed,
            "stats": self.stats, "notes": self.notes, "before": self.before, "after": self.after,
        }
        if self.dropped is not None:
            d["dropped"] = self.dropped
        return d


def graph_stats(graph: gs.Graph) -> dict[str, int]:
    """Node, initializer and weight-byte counts, read from shapes only (no weight is loaded)."""
    nodes = 0
    consts: dict[str, gs.Constant] = {}
    for g in graph_and_bodies(graph):  # the scope of protowalk.model_stats: graphs and bodies, by name
        nodes += len(g.nodes)
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    consts.setdefault(t.name, t)
    nbytes = 0
    for c in consts.values():
        try:
            nbytes += int(math.prod(c.shape)) * np.dtype(c.dtype).itemsize  # math.prod: np.prod is 10x slower per call
        except (TypeError, ValueError):
            pass
    return {"nodes": nodes, "initializers": len(consts), "bytes": nbytes}


class _Workspace:
    """Holds the model as a ModelProto or a gs.Graph and converts only when the next pass needs the other."""

    def __init__(self, proto: ModelProto) -> None:
        self._proto: ModelProto | None = proto
        self._graph: gs.Graph | None = None
        self.template = proto
        # The proto we were given is the caller's (and may be what validation compares against):
        # a model-level pass gets a copy of it, never the object itself.
        self._shared = True

    def proto_for_pass(self) -> ModelProto:
        proto = self.proto()
        if self._shared:
            copy = ModelProto()
            copy.CopyFrom(proto)  # weights left on disk are copied as their small stubs
            proto = self._proto = copy
            self._shared = False
        return proto

    def graph(self) -> gs.Graph:
        if self._graph is None:
            self._graph = to_gs(self._proto)
            self._proto, self._shared = None, False  # to_gs copies: the caller's proto is not edited
        return self._graph

    def proto(self) -> ModelProto:
        if self._proto is None:
            g = self._graph
            toposort(g)
            self._proto = to_proto(g, self.template)
            self._graph = None
        return self._proto

    def set_proto(self, proto: ModelProto) -> None:
        self._proto, self._graph, self._shared = proto, None, False
        self.template = proto  # a model-level pass may change opsets (e.g. quantization upgrades to 13)

    def stats(self) -> dict[str, int]:
        return graph_stats(self._graph) if self._graph is not None else model_stats(self._proto)


class PassManager:
    """Runs a pipeline of pass names over a model."""

    def sections(self) -> dict[str, Any]:
        """Each pass's details from its last run that had any, keyed by its report section."""
        out: dict[str, Any] = {}
        for p, rec in self._ran:
            if rec.details:
                out[p.report_section or p.name] = rec.details
        return out

    def __init__(self, names: list[str], *, options: dict[str, Any] | None = None, max_rounds: int = MAX_ROUNDS,
                 verify: Callable[[ModelProto, str], None] | None = None,
                 on_stage: Callable[[ModelProto, str], None] | None = None) -> None:
        """``options``: pass options by pass name (from ``resolve_options``); missing ones get defaults."""
        registry = load_passes()
        options = options or {}
        self.passes = [registry[n](options.get(n)) for n in names]
        self.max_rounds = max_rounds
        self.verify = verify  # called after each pass that changed the model (check-each-pass)
        self.on_stage = on_stage  # called after each lossy pass: per-stage metrics for the report
        self.records: list[PassRecord] = []
        self._ran: list[tuple[Pass, PassRecord]] = []
        self.warnings: list[str] = []

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
        lossy_left = sum(not p.lossless for p in self.passes)
        kept_lossy = 0  # lossy stages that changed the model and were not dropped
        for group in self._groups():
            rounds = self.max_rounds if group[0].lossless else 1
            for rnd in range(1, rounds + 1):
                any_changed = False
                for p in group:
                    ctx.progress(f"{p.name} (round {rnd})" if rounds > 1 else p.name)
                    if p.lossless:
                        rec = self._run_one(p, ws, ctx, rnd, done)
                    else:
                        lossy_left -= 1
                        rec = self._run_lossy(p, ws, ctx, done, may_drop=bool(lossy_left or kept_lossy))
                        kept_lossy += rec.changed and rec.dropped is None
                    done.append(p.name)
                    any_changed |= rec.changed and not p.annotates_only
                if not any_changed:
                    break
            else:
                if rounds > 1:  # still changing after the last round: correct, but maybe not minimal
                    self.warnings.append(
                        f"passes {','.join(p.name for p in group)} still changed the model in round {rounds} "
                        f"(the round limit); running onnxslim again on the output may shrink it further")
        return ws.proto()

    def _run_lossy(self, p: Pass, ws: _Workspace, ctx: Context, done: list[str], *, may_drop: bool) -> PassRecord:
        """One lossy stage. When its result fails the stage's own gate (``ctx.gate_failures``) and another
        lossy stage of the pipeline can still give a result, the stage is undone and the pipeline goes on:
        ``prune,quantize-static`` on a CPU where INT8 is slower writes the pruned model and says that
        quantization was dropped and why (the same reason a lone ``quantize-static`` is refused with)."""
        before_failures = len(ctx.gate_failures)
        snapshot = None
        if may_drop:
            snapshot = ModelProto()
            snapshot.CopyFrom(ws.proto())  # a pass may edit the proto it is given in place
        rec = self._run_one(p, ws, ctx, 1, done)
        failures = ctx.gate_failures[before_failures:]
        if failures and snapshot is not None:
            del ctx.gate_failures[before_failures:]
            ws.set_proto(snapshot)
            rec.dropped = "; ".join(failures)
            rec.after = ws.stats()
            self.warnings.append(f"stage '{p.name}' dropped, the pipeline goes on without it: {rec.dropped}")
        return rec

    def _run_one(self, p: Pass, ws: _Workspace, ctx: Context, rnd: int, done: list[str]) -> PassRecord:
        before = ws.stats()
        t0 = time.perf_counter()
        try:
            if p.level == "graph":
                result = p.run(ws.graph(), ctx)
            else:
                proto = ws.proto_for_pass()
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
        self._ran.append((p, rec))
        if result.changed and self.verify is not None:
            self.verify(ws.proto(), p.name)
        if not p.lossless and self.on_stage is not None:
            self.on_stage(ws.proto(), p.name)
        return rec


def describe_passes() -> list[dict[str, Any]]:
    return [{"name": c.name, "description": c.description, "lossless": c.lossless}
            for c in sorted(load_passes().values(), key=lambda c: (not c.lossless, c.name))]
