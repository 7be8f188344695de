"""The stage breakdown per backend as stacked bars (PNG), beside the original's 11 s and the 3 s target.

Those two lines are drawn only for the case they are stated for (12 s at 672x384, full-size model); for any
other run the chart says so instead of drawing a comparison that does not hold.
"""

from __future__ import annotations

import re
from pathlib import Path

from k4trt.bench.harness import DIT
from k4trt.bench.timing import format_seconds
from k4trt.runtime.report import WITHIN

_STEP = re.compile(r"dit step (\d+)")
_COLOURS = {"text encoder": "#8c6bb1", "prep": "#bdbdbd", DIT: "#08306b", "vae decode": "#e6550d", "output": "#969696"}
_STEP_COLOURS = ("#08519c", "#3182bd", "#6baed6", "#9ecae1")


def stage_chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["backends"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 5))
    drawn: set[str] = set()
    for x, name in enumerate(names):
        result = doc["backends"][name]
        if result["status"] != "ok":
            continue
        bottom = 0.0
        for stage, cell in _stacked_stages(result["summary"]):
            label = None if stage in drawn else ("dit (4 steps, one graph)" if stage == DIT else stage)
            drawn.add(stage)
            ax.bar(x, cell["median_s"], bottom=bottom, color=_colour(stage), label=label, width=0.6)
            bottom += cell["median_s"]
        ax.annotate(format_seconds(result["summary"]["total"]["median_s"]), (x, bottom), ha="center", va="bottom",
                    fontsize=9)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n if doc["backends"][n]["status"] == "ok" else f"{n}\n({doc['backends'][n]['status']})"
                        for n in names])
    ref = doc["reference"]
    s = doc["settings"]
    title = [f"{doc['device']['name']}: {s['width']}x{s['height']}, {s['duration_s']} s, commit {doc['commit']}",
             *doc["notes"]]
    if ref["applies"]:
        ax.axhline(ref["original_s"], color="#cb181d", linestyle="--",
                   label=f"original, authors' figure: {ref['original_s']:.0f} s")
        ax.axhline(ref["target_s"], color="#238b45", linestyle=":", label=f"target: {ref['target_s']:.0f} s")
    else:
        title.append(f"(no line at the original's {ref['original_s']:.0f} s: it is stated for 12 s at 672x384 only)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # room for the totals above the bars
    ax.set_title("\n".join(title), fontsize=9)
    ax.set_ylabel(f"seconds (stage medians of {s['repeat']} runs, stacked)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _stacked_stages(summary: dict[str, dict]) -> list[tuple[str, dict]]:
    """Stages that add up to a run: the steps when timed one by one (not also their sum), never the total nor
    what was measured within another stage (the sequence-parallel exchange)."""
    has_steps = any(_STEP.fullmatch(stage) for stage in summary)
    return [(stage, cell) for stage, cell in summary.items()
            if stage != "total" and stage not in WITHIN and not (stage == DIT and has_steps)]


def _colour(stage: str) -> str:
    step = _STEP.fullmatch(stage)
    if step:
        return _STEP_COLOURS[(int(step.group(1)) - 1) % len(_STEP_COLOURS)]
    return _COLOURS.get(stage, "#636363")

