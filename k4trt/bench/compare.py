"""`k4trt bench-compare NEW.json --against benchmarks/results/`: exit 1 on a regression.

The baseline is the newest result under the folder (searched recursively; one JSON per run) measured on the
same device model with the same workload (size, duration, kind of weights). Against it, every backend the
baseline measured must still be measured, and its median total must not exceed the baseline's by more than
the threshold (10 % by default: well above the run-to-run spread of a median of several multi-second runs,
well below the gains the optimisation log tracks). With no comparable baseline there is nothing to
regress from, which is said, and the exit status is 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from k4trt.errors import K4TRTError

DEFAULT_THRESHOLD = 0.10


@dataclass(frozen=True)
class Finding:
    backend: str
    baseline_s: float
    new_s: float | None  # None: the backend was not measured this time
    regressed: bool
    detail: str


def workload_key(doc: dict) -> tuple:
    """What must match for two results to be comparable. Weights count by kind only: the same released
    weights live at different paths on different machines."""
    s = doc["settings"]
    weights = s["weights"] if s["weights"] in ("random", "tiny random") else "weights"
    return doc["device"]["name"], s["width"], s["height"], s["duration_s"], weights


def read_result(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise K4TRTError(f"{path} is not a readable result JSON ({e}); rerun the benchmark or remove the file") from None
    if not isinstance(doc, dict) or not {"schema", "device", "settings", "date", "backends"} <= doc.keys():
        raise K4TRTError(f"{path} is not a k4trt benchmark result (it lacks schema/device/settings/date/backends)")
    return doc


def find_baseline(new: dict, new_path: Path, against: Path) -> tuple[Path, dict] | None:
    """The newest comparable result under `against`, other than `new_path` itself."""
    key = workload_key(new)
    candidates = []
    for path in sorted(against.rglob("*.json")):
        if path.resolve() == new_path.resolve():
            continue
        doc = read_result(path)
        if workload_key(doc) == key:
            candidates.append((doc["date"], path, doc))
    if not candidates:
        return None
    _, path, doc = max(candidates, key=lambda c: c[0])
    return path, doc


def compare(new: dict, baseline: dict, threshold: float = DEFAULT_THRESHOLD) -> list[Finding]:
    findings = []
    for name, old in baseline["backends"].items():
        if old["status"] != "ok" or name not in new["backends"]:
            continue  # nothing to regress from, or not asked for this time
        old_s = old["summary"]["total"]["median_s"]
        result = new["backends"][name]
        if result["status"] != "ok":
            why = result.get("reason") or result.get("error")
            findings.append(Finding(name, old_s, None, True, f"measured in the baseline, {result['status']} now: {why}"))
            continue
        new_s = result["summary"]["total"]["median_s"]
        change = new_s / old_s - 1
        regressed = change > threshold
        verdict = f"{'REGRESSION' if regressed else 'ok'}: {change:+.1%} (limit +{threshold:.0%})"
        findings.append(Finding(name, old_s, new_s, regressed, verdict))
    return findings


def check(new_path: Path, against: Path, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Print the comparison of `new_path` with its baseline under `against`; 1 on a regression, else 0."""
    if not threshold >= 0:
        raise K4TRTError(f"--threshold {threshold} must be a fraction >= 0, e.g. 0.10 for 10 %")
    new = read_result(new_path)
    if not against.is_dir():
        print(f"no baseline: {against} does not exist (no result committed yet); nothing to compare")
        return 0
    found = find_baseline(new, new_path, against)
    if found is None:
        print(f"no baseline: no result under {against} for {' / '.join(map(str, workload_key(new)))}; "
              "nothing to compare")
        return 0
    path, baseline = found
    print(f"baseline: {path} (commit {baseline.get('commit')}, {baseline['date']})")
    findings = compare(new, baseline, threshold)
    for f in findings:
        now = f"{f.new_s:.3f} s" if f.new_s is not None else "-"
        print(f"  {f.backend:<12} {f.baseline_s:8.3f} s -> {now:>9}  {f.detail}")
    regressions = [f.backend for f in findings if f.regressed]
    if regressions:
        print(f"regressed: {', '.join(regressions)}")
        return 1
    return 0

