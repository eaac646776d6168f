"""Fuzzing (issue 6): >= 500 deterministic mutations of valid models through the default pipeline.

Every case either writes a model that matches the original in onnxruntime (or, when the original
cannot run there, keeps its interface and passes the checker), or exits 1/2 with exactly one line.
Never a traceback, never past the timeout, never a partial output or leftover file, never a
modified input. The corpus runs in-process for speed; every 20th case also runs as a real process,
which also catches anything C++ code prints and hard crashes. Counts are printed (README numbers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402

N_CASES = 600
SUBPROCESS_EVERY = 20


@pytest.fixture(autouse=True)
def _short_run_timeout(monkeypatch) -> None:
    """Endless Loops in the corpus are stopped after 5 s instead of the default 20 (CI time)."""
    import onnxslim.runtime

    monkeypatch.setattr(onnxslim.runtime, "RUN_TIMEOUT", 5.0)
    monkeypatch.setenv("ONNXSLIM_RUN_TIMEOUT", "5")  # the subprocess sample


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[fuzz.Case]:
    return fuzz.generate(tmp_path_factory.mktemp("fuzz") / "corpus", N_CASES, seed=0)


def test_corpus_is_deterministic_and_large(corpus: list[fuzz.Case], tmp_path: Path) -> None:
    assert len(corpus) >= 500
    again = fuzz.generate(tmp_path / "again", 40, seed=0)
    for a, b in zip(corpus[:40], again):
        assert (a.kind, a.mutation, a.base) == (b.kind, b.mutation, b.base)
        if a.mutation != "absolute":  # that one names the corpus folder itself
            assert a.model.read_bytes() == b.model.read_bytes()
    kinds = {c.kind for c in corpus}
    assert kinds == {"file", "valid", "external", "bytes", "proto", "odd"}
    families = {c.mutation.split("+")[0] for c in corpus if c.kind == "proto"}
    assert families == set(fuzz.PROTO_MUTATIONS)


def _report(outcomes: list[fuzz.Outcome], label: str) -> None:
    print(f"\nfuzz ({label}): {len(outcomes)} cases: {fuzz.summarize(outcomes)}")
    for o in outcomes:
        if o.category in ("violation", "internal-error", "pass-error"):
            print(f"  {o.category} {o.case}: code {o.code}; {'; '.join(o.problems)}; {o.stderr[-300:]}")


def _assert_clean(outcomes: list[fuzz.Outcome]) -> None:
    bad = [o for o in outcomes if o.category in ("violation", "internal-error")]
    assert not bad, "\n".join(f"{o.case}: code {o.code}; {o.problems}; {o.stderr[-400:]}" for o in bad[:10])


@pytest.mark.slow
def test_fuzz_in_process(corpus: list[fuzz.Case], tmp_path: Path) -> None:
    outcomes = [fuzz.run_case(c, tmp_path) for c in corpus]
    _report(outcomes, "in-process")
    _assert_clean(outcomes)
    counts = fuzz.summarize(outcomes)
    # The corpus exercises both ends: plenty refused, and valid models still optimized and validated.
    assert counts.get("exit-2", 0) >= 300
    assert counts.get("written-valid", 0) >= 20
    by_case = {o.case: o for o in outcomes}
    for c in corpus:
        o = by_case[c.name]
        if c.kind in ("valid", "odd"):
            assert o.category == "written-valid", o
        if c.kind in ("file",) or (c.kind == "external" and not c.mutation.startswith("ok")):
            assert o.category == "exit-2", o


@pytest.mark.slow
def test_fuzz_subprocess_sample(corpus: list[fuzz.Case], tmp_path: Path) -> None:
    sample = corpus[::SUBPROCESS_EVERY]
    outcomes = [fuzz.run_case(c, tmp_path, subprocess_mode=True) for c in sample]
    _report(outcomes, "subprocess")
    _assert_clean(outcomes)
