"""Structured pruning engine: channel tracing, groups, importance and plans, rewriting, cost; the
least-squares refit (``onnxslim.prune.refit``) and the sensitivity analysis (``onnxslim.prune.sensitivity``)
are imported on use (they need calibration data and onnxruntime sessions).

``from onnxslim import prune as ch`` gives the channel API in one namespace: ``ch.analyze(ch.traced_graph(m))``,
``ch.importance``, ``ch.plan``, ``ch.pruned_copy``, ``ch.export``, ``ch.cost``, ``ch.group_table``.
The engine never imports the pass manager or the API; ``onnxslim.passes.prune`` turns it into a pass.
"""

from onnxslim.prune.cost import Cost, cost, group_table
from onnxslim.prune.grouping import analyze
from onnxslim.prune.importance import DEFAULT_ROUND_TO, importance, kept_count, plan
from onnxslim.prune.rewrite import apply, export, pruned_copy
from onnxslim.prune.tracing import (Analysis, Consumer, Group, Layout, SliceEdit, Source, keep_positions,
                                    traced_graph)

__all__ = ["Analysis", "Consumer", "Cost", "DEFAULT_ROUND_TO", "Group", "Layout", "SliceEdit", "Source", "analyze",
           "apply", "cost", "export", "group_table", "importance", "keep_positions", "kept_count", "plan",
           "pruned_copy", "traced_graph"]
