"""The baseline gate, one implementation for both benchmarks: a result compared with a baseline result of the same
kind, metric by metric within a tolerance, after checks that the two are comparable at all.

Every gate runs the same steps (`Gate.check`): the baseline must be a result of the same kind and schema version;
each of the gate's refusals may declare it not comparable (the first that does is the gate's only problem); the
gate's metrics are compared (`compare_metrics`: undefined, missing and noisy values handled once, here); a last
check may add what the metrics alone cannot see. A gate that groups its metrics may measure a group with a
regression again (`Gate.judge`), and only what reproduces stands. What each benchmark compares is its own:
`stages.latency_gate` (the runtime's seconds, or ratios across machines, re-measured before a regression is
reported) and `scoring.accuracy_gate` (rates and |P(unsafe)| differences, with absolute tolerances; nothing
re-measured: the same items give the same answers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import SCHEMA_VERSION


@dataclass(frozen=True)
class Metric:
    """One gated figure. `tolerance` is a fraction of the baseline (relative) or, with `absolute`, a plain
    difference (rates, probabilities: a relative bound is meaningless near 0). `best` is the current run's
    best sample (fastest time, highest rate) when there are several: a timing regresses only when its median
    AND its best run are both beyond the tolerance, the best against the baseline's best (see `_regressed`)."""

    value: float | None
    tolerance: float
    higher_is_better: bool = False
    absolute: bool = False
    best: float | None = None
    floor: float = 0.0  # the smallest difference (in the metric's units) that counts: timer and scheduler noise

    def describe(self) -> str:
        kind = f"{self.tolerance:g} absolute" if self.absolute else f"{self.tolerance:.0%}"
        return f"tolerance {kind}, {'higher' if self.higher_is_better else 'lower'} is better"


@dataclass
class GateResult:
    problems: list[str] = field(default_factory=list)  # regressions and refusals: the gate fails
    notes: list[str] = field(default_factory=list)  # what was not compared, and why
    compared: int = 0
    regressed: dict[str, str] = field(default_factory=dict)  # metric key -> its problem (also in `problems`)


def _beyond(v: float, base: float, tol: float, higher_is_better: bool, absolute: bool, floor: float = 0.0) -> bool:
    if abs(v - base) <= floor:
        return False
    if absolute:
        return v < base - tol if higher_is_better else v > base + tol
    if base == 0:
        return (not higher_is_better) and v > 0  # from nothing to something: no fraction applies
    return v < base * (1 - tol) if higher_is_better else v > base * (1 + tol)


def _regressed(cur: Metric, base: float, base_best: float | None = None) -> tuple[bool, str]:
    """(regressed, why not when only the median moved). Timings on a shared machine only ever gain time from
    other work (a preempted thread, a page fault), so the fastest of several runs is the estimate of a
    build's cost that noise disturbs least (the reasoning of Python's `timeit`: the minimum, not the mean).
    A real slowdown moves every run, the fastest included; noise that hits some runs moves the median only.
    So a timing regresses when its median is beyond the tolerance of the baseline's median AND its best run
    is beyond the tolerance of the baseline's best run; each difference must also exceed `floor`. Without
    the baseline's best: the best run must be worse than the baseline's median."""
    hib = cur.higher_is_better
    if not _beyond(cur.value, base, cur.tolerance, hib, cur.absolute, cur.floor):
        return False, ""
    if cur.best is None or not math.isfinite(cur.best):
        return True, ""
    if base_best is not None and math.isfinite(base_best):
        if _beyond(cur.best, base_best, cur.tolerance, hib, cur.absolute, cur.floor):
            return True, ""
        return False, (f"median {cur.value:.4g} vs {base:.4g} is beyond the tolerance, the best run {cur.best:.4g} vs "
                       f"{base_best:.4g} is within it (or within the floor): some runs were disturbed, not counted "
                       "as a regression")
    if cur.best < base if hib else cur.best > base:
        return True, ""
    return False, (f"median {cur.value:.4g} vs {base:.4g} is beyond the tolerance, the best run {cur.best:.4g} "
                   "is not worse than the baseline's median: not counted as a regression")


def compare_metrics(current: dict[str, Metric], baseline: dict[str, float | None],
                    require_all: bool = False, baseline_best: dict[str, float | None] | None = None) -> GateResult:
    """Every metric of the baseline against this run. A metric that was defined in the baseline and is
    undefined (None) or non-finite now is a problem; one missing on either side is noted, not compared (with
    `require_all`, one the baseline has and this run lacks is a problem); if no metric is shared at all the
    gate fails ("nothing to compare") instead of passing vacuously. `baseline_best`: the baseline's best run
    per metric, for timings measured several times (`_regressed`)."""
    out = GateResult()
    for key in sorted(set(current) | set(baseline)):
        if key not in current and require_all and baseline[key] is not None:
            out.problems.append(f"{key}: in the baseline ({baseline[key]:.4g}) but not measured in this run")
            continue
        if key not in current or key not in baseline:
            out.notes.append(f"{key}: only in the {'baseline' if key in baseline else 'current run'}, not compared")
            continue
        cur, base = current[key], baseline[key]
        if base is not None and not math.isfinite(base):
            base = None  # a NaN baseline compares false with everything: it would pass any value
        if base is None and cur.value is None:
            out.notes.append(f"{key}: undefined in both runs")
            continue
        if base is None:
            out.notes.append(f"{key}: undefined in the baseline, {cur.value:.4g} now; not compared")
            continue
        out.compared += 1
        if cur.value is None or not math.isfinite(cur.value):
            out.problems.append(f"{key}: {cur.value} now, {base:.4g} in the baseline (the metric became undefined)")
        else:
            regressed, why_not = _regressed(cur, base, (baseline_best or {}).get(key))
            if regressed:
                change = f"{cur.value - base:+.4g}" if cur.absolute or base == 0 else f"{cur.value / base - 1:+.1%}"
                best = f", best run {cur.best:.4g}" if cur.best is not None else ""
                out.regressed[key] = f"{key}: {cur.value:.4g} vs baseline {base:.4g} ({change}{best}; {cur.describe()})"
                out.problems.append(out.regressed[key])
            elif why_not:
                out.notes.append(f"{key}: {why_not}")
    if out.compared == 0:
        out.problems.append("nothing to compare: the baseline and this run share no metric (see the notes)")
    return out


@dataclass
class Comparison:
    """What a gate compares: this run's metrics, the baseline's values and best runs by the same keys, and notes
    on what was left out. `require_all`: a metric of the baseline that this run lacks is a problem."""

    current: dict[str, Metric]
    baseline: dict[str, float | None]
    baseline_best: dict[str, float | None] | None = None
    notes: list[str] = field(default_factory=list)
    require_all: bool = False


Refusal = Callable[[dict, dict], str | None]  # (this run, baseline) -> why they are not comparable, or None


@dataclass(frozen=True)
class Gate:
    """One benchmark's baseline gate (module docstring): its kind, why a baseline is not comparable, what is compared
    and, with `group`, which regressions are measured again before they count."""

    kind: str  # the results' `kind` ("latency", "accuracy"): the baseline must be one too
    schema_change: str  # what another schema_version means for this kind's figures
    refusals: tuple[Refusal, ...]  # checked in order; the first that answers is the only problem
    compare: Callable[[dict, dict], Comparison]
    settle: Callable[[dict, dict, GateResult], None] | None = None  # a last word on the result, given both runs
    group: Callable[[str], str | None] | None = None  # a metric key -> what to measure again for it (or None)

    def check(self, doc: dict, base: dict) -> GateResult:
        """This run (`doc`) against a baseline run's JSON (`base`)."""
        for refuse in (self._other_kind, self._other_schema, *self.refusals):
            why = refuse(doc, base)
            if why:
                return GateResult(problems=[why])
        c = self.compare(doc, base)
        result = compare_metrics(c.current, c.baseline, require_all=c.require_all, baseline_best=c.baseline_best)
        if self.settle is not None:
            self.settle(doc, base, result)
        result.notes[:0] = c.notes
        return result

    def judge(self, doc: dict, base: dict, remeasure: Callable[[list[str]], dict] | None = None) -> GateResult:
        """`check`, then, for a gate with `group` given `remeasure`: the groups with a regression measured again
        (`remeasure(groups)` returns this run's document with their new figures) and judged once more (`confirm`)."""
        result = self.check(doc, base)
        again = sorted({g for k in result.regressed if (g := self.group(k))}) if self.group and remeasure else []
        if not again:
            return result
        # Timings on a shared machine drift for tens of seconds at a time (measured on 2 cores: the tiny text
        # prefill's best run at 10.7-11.8 ms for three consecutive runs, then 6.8-7.9 ms for thirteen). A
        # regression is measured once more before it is reported; `confirm` keeps only what reproduces.
        print(f"\nre-measuring {', '.join(again)} to confirm {len(result.regressed)} regression(s)")
        return confirm(result, self.check(remeasure(again), base), again, self.group)

    def _other_kind(self, doc: dict, base: dict) -> str | None:
        if base.get("kind") != self.kind:
            return f"the baseline's kind is {base.get('kind')!r}, not {self.kind!r}: another benchmark's result"
        return None

    def _other_schema(self, doc: dict, base: dict) -> str | None:
        if base.get("schema_version") != SCHEMA_VERSION:
            return (f"the baseline has schema_version {base.get('schema_version')}, this {self.kind}.py writes "
                    f"{SCHEMA_VERSION}: {self.schema_change}, so its figures are not comparable; record a new "
                    "baseline with this version")
        return None


def _key(problem: str) -> str:
    """The metric key a problem line starts with (`key: ...`)."""
    return problem.split(": ", 1)[0]


def confirm(first: GateResult, second: GateResult, groups: list[str], group: Callable[[str], str | None]) -> GateResult:
    """The gate's outcome after a confirmation pass of `groups`: a regression in a re-measured group stands only if
    the second measurement shows it too (a real slowdown does not go away; a window of machine noise does)."""
    redone = [k for k in first.regressed if group(k) in groups]
    out = GateResult(notes=list(first.notes), compared=first.compared)
    out.problems = [p for p in first.problems if p not in {first.regressed[k] for k in redone}]
    out.regressed = {k: v for k, v in first.regressed.items() if k not in redone}
    # anything else the second measurement got wrong in a re-measured group (a metric that became undefined)
    remeasured = [p for p in second.problems if p not in second.regressed.values() and group(_key(p)) in groups]
    for key in redone:
        if key in second.regressed:
            out.regressed[key] = f"{first.regressed[key]}; confirmed: {second.regressed[key].split(': ', 1)[1]}"
            out.problems.append(out.regressed[key])
        elif any(_key(p) == key for p in remeasured):
            out.regressed[key] = first.regressed[key]
            out.problems.append(out.regressed[key])
        else:
            out.notes.append(f"{first.regressed[key]}; not confirmed: in the second measurement of {group(key)} "
                             "it is within the tolerance (or the floor), so the first was machine noise")
    out.problems += [f"{p} (in the confirmation pass)" for p in remeasured]
    return out


def load_baseline(parser, path: Path | None) -> dict | None:
    """--baseline's JSON, read before minutes of measuring, not after (a parser error when it cannot be read)."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        parser.error(f"--baseline {path}: not a readable JSON file ({exc})")


def report_gate(result: GateResult, baseline: Path) -> int:
    """Print the gate's outcome; the exit code (1 on any problem)."""
    for note in result.notes:
        print(f"  note: {note}")
    if result.problems:
        print(f"\nREGRESSION against {baseline}:\n  " + "\n  ".join(result.problems))
        return 1
    print(f"\nno regression against {baseline} ({result.compared} metrics compared)")
    return 0
