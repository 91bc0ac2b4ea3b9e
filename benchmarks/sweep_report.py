"""The model-type sweep's results: rows merged into one JSON, and the markdown and README paragraph
made from it (benchmarks/sweep_model_types.py runs the sweep and calls these).

The JSON holds one section per transformers version (and experts implementation, where not the
default), each {model type: row}; a row is what sweep_model_types.measure returns. The goal a row
is checked against: exact at every world size N, with the parameters per rank <= 1/N + 0.05
(0.55 at N=2), for every type that builds and has at least 4 heads.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_JSON = os.path.join(RESULTS, "model_types_sweep.json")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
README_HEADING = "### Every other causal-LM model type (sweep)"
GOAL_SLACK = 0.05  # parameters per rank may exceed 1/N by this much (norms, biases, the router stay whole)
MIN_HEADS = 4
WORLD_SIZES = ("2", "3", "4")  # as the JSON's keys
NOT_MEASURED = {"result": "error", "detail": "not measured"}  # a row's world size missing from the JSON
RESULTS_ORDER = ("wrong", "error", "refused", "exact")  # the first that a row has is the one its reason names


@dataclass(frozen=True)
class Section:
    """The software a section of the JSON was measured with."""
    transformers: str
    torch: str
    experts_implementation: str = ""

    @property
    def key(self) -> str:
        minor = ".".join(self.transformers.split(".")[:2])
        experts = f", experts {self.experts_implementation}" if self.experts_implementation else ""
        return f"transformers {minor}{experts}"


def load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge(path: str, section: Section, rows: list[dict], candidates: Optional[list[str]] = None) -> dict:
    """Put `rows` into `section` of the JSON at `path`, replacing those of the same model types and
    keeping every other row and section, and the section's `candidates` (every type its version
    has to sweep: the ones without a row are listed as not run); returns the whole. Runs of two
    transformers versions may merge into the same file at once: the lock makes each
    read-modify-write whole."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        entry = data.setdefault(section.key, {"types": {}})
        entry.update(transformers=section.transformers, torch=section.torch,
                     experts_implementation=section.experts_implementation)
        if candidates is not None:
            entry["candidates"] = sorted(candidates)
        entry["types"].update({row["model_type"]: row for row in rows})
        entry["types"] = dict(sorted(entry["types"].items()))
        with open(path + ".tmp", "w") as f:
            json.dump(dict(sorted(data.items())), f, indent=1)
            f.write("\n")
        os.replace(path + ".tmp", path)
    return data


def bound(world_size: int) -> float:
    return 1 / world_size + GOAL_SLACK


def meets_goal(world_size: str, size: dict) -> bool:
    return size["result"] == "exact" and size["params_per_rank"] <= bound(int(world_size)) + 1e-9


class Verdict(NamedTuple):
    goal: str    # "yes", "no (N=...)", or "-" where the type does not build
    cause: str   # what keeps the goal from holding, as the summary counts it
    reason: str  # the row's "why not": the cause with its details


def verdict(row: dict) -> Verdict:
    """Whether the goal holds for a row that is not skipped, and why not."""
    if row.get("build_failure"):
        return Verdict("-", "does not build", f"does not build: {row['build_failure']}")
    sizes = {ws: row["sizes"].get(ws, NOT_MEASURED) for ws in WORLD_SIZES}
    failing = {ws: s for ws, s in sizes.items() if not meets_goal(ws, s)}
    if not failing:
        return Verdict("yes", "", "")
    ws, size = min(failing.items(), key=lambda item: RESULTS_ORDER.index(item[1]["result"]))
    if size["result"] != "exact":
        cause, reason = size["result"], f"N={ws} {size['result']}: {size['detail']}"
    elif size["params_mean"] <= bound(int(ws)) + 1e-9:
        cause = f"uneven split at N={ws}"
        reason = (f"N={ws} uneven split: the fullest rank holds {size['params_per_rank']:.2f}, the mean "
                  f"{size['params_mean']:.2f} ({row.get('heads')} heads over {ws} ranks)")
    else:  # heads that do not divide over the ranks stay whole (a tiny config's 2 kv heads at N=3 and 4), and so
        # do position tables, which tiny configs make a large share of the parameters
        replicated = size["biggest_replicated"]
        kind = "heads undivided" if "heads do not divide over" in replicated else \
            "position table whole" if "looked up by positions" in replicated else "parameters replicated"
        cause = f"{kind} at N={ws}"
        reason = f"N={ws} params/rank {size['params_per_rank']:.2f}, replicated {size['biggest_replicated']}"
    heads = row.get("heads")
    if heads is not None and heads < MIN_HEADS:
        cause, reason = f"fewer than {MIN_HEADS} heads", f"fewer than {MIN_HEADS} heads ({heads}); {reason}"
    return Verdict(f"no (N={', '.join(failing)})", cause, reason)


COLUMNS = ("model type", "heads", "N=2", "N=3", "N=4", "max abs diff", "params / rank (N=2, 3, 4)",
           "all_reduce / layer (N=2)", "goal", "why not")


def cells(row: dict) -> list[str]:
    sizes = row["sizes"]
    results = [sizes.get(ws, {}).get("result", "") for ws in WORLD_SIZES]
    diffs = [s["max_abs_diff"] for s in sizes.values() if "max_abs_diff" in s]
    fractions = [f"{sizes[ws]['params_per_rank']:.2f}" if "params_per_rank" in sizes.get(ws, {}) else "-"
                 for ws in WORLD_SIZES]
    goal, _, why = verdict(row)
    return [row["model_type"], str(row.get("heads") or "-"),
            *[f"**{r.upper()}**" if r == "wrong" else r for r in results],
            f"{max(diffs):.1e}" if diffs else "", ", ".join(fractions) if diffs else "",
            sizes.get("2", {}).get("all_reduce_per_layer", ""), goal, why.replace("|", "/")]


def row_line(row: dict) -> str:
    if row.get("skipped"):
        return f"| {row['model_type']} | skipped: {row['skipped']} |"
    return "| " + " | ".join(cells(row)) + " |"


def summary(entry: dict) -> dict:
    """Counts over a section: the types tried, skipped, built, and per outcome."""
    rows = list(entry["types"].values())
    built = [r for r in rows if not r.get("skipped") and not r.get("build_failure")]
    with_heads = [r for r in built if (r.get("heads") or 0) >= MIN_HEADS]  # the goal is for these
    return {
        "types": len(rows),
        "not run": sorted(set(entry.get("candidates", ())) - set(entry["types"])),
        "skipped": sum(bool(r.get("skipped")) for r in rows),
        "build failures": Counter(r["build_failure"].split(":")[0] for r in rows if r.get("build_failure")),
        "built": len(built),
        "exact at every N": sum(all(r["sizes"].get(ws, NOT_MEASURED)["result"] == "exact" for ws in WORLD_SIZES)
                                for r in built),
        "per N": {ws: Counter(r["sizes"].get(ws, NOT_MEASURED)["result"] for r in built) for ws in WORLD_SIZES},
        "wrong": [f"{r['model_type']} N={ws}" for r in built for ws, s in r["sizes"].items() if s["result"] == "wrong"],
        "goal applies": len(with_heads),
        "goal holds": sum(verdict(r).goal == "yes" for r in with_heads),
        "goal fails": Counter(verdict(r).cause for r in with_heads if verdict(r).goal != "yes"),
    }


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def summary_sentence(entry: dict) -> str:
    """A section's outcome, with each world size's counts and the types not run yet."""
    s = summary(entry)
    tried = s["types"] - s["skipped"]
    not_run = f"{len(s['not run'])} types not run yet ({', '.join(s['not run'])}); " if s["not run"] else ""
    failures = f": {_counts(s['build failures'])}" if s["build failures"] else ""
    per_n = "; ".join(f"N={ws}: {_counts(c)}" for ws, c in s["per N"].items())
    return (f"{_software(entry)}: {not_run}{s['types']} types, {s['skipped']} skipped; of the {tried} tried, {s['built']} build "
            f"({tried - s['built']} do not{failures}); {s['exact at every N']} are exact at N=2, 3 and 4, "
            f"{_wrong(s)} ({per_n}); the goal holds for {s['goal holds']} of the {s['goal applies']} with "
            f">= {MIN_HEADS} heads{' (not: ' + _counts(s['goal fails']) + ')' if s['goal fails'] else ''}.")


def short_summary(entry: dict) -> str:
    """A section's outcome in README's few words."""
    s = summary(entry)
    not_run = f", {len(s['not run'])} not run yet" if s["not run"] else ""
    causes = ", ".join(f"{k} {v}" for k, v in s["goal fails"].most_common(2))
    return (f"{_software(entry)}: {s['types'] - s['skipped']} types tried{not_run}, {s['built']} build, "
            f"{s['exact at every N']} exact at N=2, 3 and 4, {_wrong(s)}; goal met by {s['goal holds']} of "
            f"{s['goal applies']}{' (not: ' + causes + ', ...)' if causes else ''}.")


def _software(entry: dict) -> str:
    experts = f", experts {entry['experts_implementation']}" if entry["experts_implementation"] else ""
    return f"transformers {entry['transformers']} (torch {entry['torch']}{experts})"


def _wrong(s: dict) -> str:
    by_type: dict[str, list[str]] = {}
    for model_type, world_size in (w.split(" N=") for w in s["wrong"]):
        by_type.setdefault(model_type, []).append(world_size)
    listed = "; ".join(f"{t} (N={', '.join(sizes)})" for t, sizes in by_type.items())
    return f"**WRONG: {listed}**" if s["wrong"] else "none wrong"


def section_markdown(key: str, entry: dict) -> list[str]:
    rows = entry["types"].values()
    skipped = Counter(r["skipped"] for r in rows if r.get("skipped"))
    lines = [f"## {key}", "", summary_sentence(entry), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [row_line(r) for r in rows if not r.get("skipped")]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(
            f"{reason}: {', '.join(r['model_type'] for r in rows if r.get('skipped') == reason)}"
            for reason in skipped) + "."]
    lines.append("")
    return lines


HEADER = """# Every other causal-LM model type: the sweep

Generated from model_types_sweep.json by `python benchmarks/sweep_model_types.py --write-markdown`;
the rows come from `python benchmarks/sweep_model_types.py [--types T ...]` (CPU, one
process per type), merged by model type. Every model type of transformers'
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` not in README's architecture table, on a tiny config shrunk from
its defaults (`fxtp.tiny_configs.generic_tiny_config`: hidden 64, 4 heads, 2 kv heads (4 where the
default is multi-head), 2 layers, vocab 256, 4 experts), float32, at world sizes N = 2, 3 and 4:
each rank's simulated logits against the unsharded model (left-padded batch, max abs diff <= 1e-4).
Per N: exact; refused (fxtp's refusal, the reason in "why not"); error (the stage: compile,
simulate, process); **WRONG** (logits differ: never expected, always shown). "params / rank": the
most parameter bytes one rank holds over the unsharded model's parameter bytes (buffers
excluded). Goal: exact with params / rank <= 1/N + 0.05 at every N, for the types that build and
have >= 4 heads; "why not" names the first failing N's reason (WRONG, then error, then refused,
then the biggest replicated parameter and the plan's reason for it). A type that does not build
(config, model, forward) fails in the generic shrinking, before fxtp.
"""


def markdown(data: dict) -> str:
    lines = [HEADER]
    for key, entry in data.items():
        lines += section_markdown(key, entry)
    return "\n".join(lines)


def readme_paragraph(data: dict) -> str:
    return (f"`python benchmarks/sweep_model_types.py` runs every other model type of transformers' "
            f"`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, shrunk from its defaults, at 2, 3 and 4 ranks (CPU). Goal: exact, "
            f"parameters per rank <= 1/N + 0.05. {' '.join(short_summary(e) for e in data.values())} "
            f"[Every row, and why the goal fails](benchmarks/results/model_types_sweep.md).")


def wrap(text: str, width: int = 110) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]


def replace_readme_section(readme: str, paragraph: str) -> str:
    """README's text with the paragraph under the sweep heading (up to the next heading) replaced."""
    lines = readme.split("\n")
    start = lines.index(README_HEADING) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("#"))
    return "\n".join(lines[:start] + [""] + wrap(paragraph) + [""] + lines[end:])


def write_markdown(results: str = RESULTS_JSON, readme: str = README) -> None:
    data = load(results)
    with open(os.path.splitext(results)[0] + ".md", "w") as f:
        f.write(markdown(data))
    with open(readme) as f:
        text = f.read()
    with open(readme, "w") as f:
        f.write(replace_readme_section(text, readme_paragraph(data)))
