"""benchmarks/sweep_model_types.py on one tiny type at 2, 3 and 4 ranks, its WRONG rows, its worker
processes' timeouts and crashes, and the JSON its rows merge into (benchmarks/sweep_report.py), with
the markdown and README paragraph made from it."""
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from benchmark_harness import benchmark_module
from fxtp.capture.export import capture
from fxtp.tiny_configs import tiny_model


@pytest.fixture
def sweep(monkeypatch):
    return benchmark_module(monkeypatch, "sweep_model_types")  # it imports benchmarks/sweep_report.py


def exact_size(params_per_rank: float) -> dict:
    return {"result": "exact", "max_abs_diff": 2e-7, "params_per_rank": params_per_rank,
            "params_mean": params_per_rank, "biggest_replicated": "", "all_reduce_per_layer": "2"}


def sweep_row(model_type: str, **sizes: dict) -> dict:
    return {"model_type": model_type, "heads": 4, "skipped": "", "sizes": {ws[1:]: s for ws, s in sizes.items()}}


def test_sweep_row_at_two_three_and_four_ranks(sweep):
    """A Llama-like type of the sweep (arcee: 4 heads, every projection sharded) is exact at N = 2, 3
    and 4, its parameters per rank halve at 2 and quarter at 4 (norms stay whole); at 3 the fullest
    rank holds 2 of the 4 heads, above 1/3 + 0.05, and the row's reason says so."""
    row = sweep.measure("arcee")
    sizes = row["sizes"]
    assert row["heads"] == 4
    assert {ws: s["result"] for ws, s in sizes.items()} == {"2": "exact", "3": "exact", "4": "exact"}
    assert all(s["max_abs_diff"] <= 1e-5 for s in sizes.values())
    assert 0.5 < sizes["2"]["params_per_rank"] < 0.51 and 0.25 < sizes["4"]["params_per_rank"] < 0.26
    assert sizes["3"]["params_per_rank"] > sweep.sweep_report.bound(3) >= sizes["3"]["params_mean"]
    assert sizes["2"]["biggest_replicated"].endswith("in no projection group")  # a norm weight
    goal, cause, why = sweep.sweep_report.verdict(row)
    assert (goal, cause) == ("no (N=3)", "uneven split at N=3") and "(4 heads over 3 ranks)" in why


def test_sweep_counts_the_pieces_capture_cut_out_of_parameters(sweep):
    """Mamba-2's in_proj is cut into pieces, some cut again (names like w[128:1280][0:128]): every
    parameter byte is on some rank, so the ranks' shares add up to at least the whole."""
    from fxtp.tiny_configs import generic_tiny_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config("mamba2")).eval()
    shares = sweep.parameter_shares(fxtp.compile(model, 2), model)
    assert 2 * shares["params_mean"] >= 1 and 0.5 <= shares["params_per_rank"] < 0.55


def test_sweep_reports_a_wrong_result_loudly(sweep, monkeypatch, tmp_path):
    """Logits that differ from the unsharded model's are a WRONG row: in the markdown, its summary,
    and the run's exit status."""
    import fxtp.testing

    def differs(model, world_size, *batch, **kwargs):
        raise AssertionError(f"world_size={world_size}: max abs diff 3.000e-01 > 1.0e-04")

    monkeypatch.setattr(fxtp.testing, "assert_equivalent", differs)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 5))
    size = sweep.measure_size(model, capture(model), 2, ids, torch.ones_like(ids))
    assert size["result"] == "wrong" and "3.000e-01" in size["detail"] and size["params_per_rank"] < 0.51

    row = sweep_row("llama", N2=size, N3=exact_size(0.36), N4=exact_size(0.26))
    monkeypatch.setattr(sweep, "sweep", lambda model_types, jobs, timeout, experts: iter([row]))
    results = str(tmp_path / "sweep.json")
    monkeypatch.setattr(sys, "argv", ["sweep_model_types.py", "--types", "llama", "--results", results])
    with pytest.raises(SystemExit, match="WRONG results .*: llama N=2"):
        sweep.main()
    data = sweep.sweep_report.load(results)
    text = sweep.sweep_report.markdown(data)
    assert "| llama | 4 | **WRONG** | exact | exact |" in text and "**WRONG: llama (N=2)**" in text
    assert sweep.sweep_report.verdict(row) == ("no (N=2)", "wrong", f"N=2 wrong: {size['detail']}")


def test_sweep_rows_merge_by_type_and_versions_stay_apart(sweep, tmp_path):
    """Runs over parts of the list (--types) replace only their types' rows; each transformers
    version keeps its own section."""
    report = sweep.sweep_report
    path = str(tmp_path / "sweep.json")
    new, old = report.Section("5.25.0", "2.13.0"), report.Section("5.17.0", "2.11.0")
    built = sweep_row("b", N2=exact_size(0.50), N3=exact_size(0.36), N4=exact_size(0.26))
    unbuilt = {**sweep_row("b"), "build_failure": "model: KeyError: 'x'"}
    report.merge(path, new, [sweep_row("a", N2=exact_size(0.50)), unbuilt])
    assert report.verdict(sweep_row("a", N2=exact_size(0.50))) == ("no (N=3, 4)", "error", "N=3 error: not measured")
    refused = sweep_row("a", N2={"result": "refused", "detail": "CaptureError: no"},
                        N3=exact_size(0.36), N4=exact_size(0.26))
    report.merge(path, old, [refused])
    report.merge(path, new, [built])
    data = report.load(path)
    assert list(data) == ["transformers 5.17", "transformers 5.25"]
    assert data["transformers 5.25"]["types"] == {"a": sweep_row("a", N2=exact_size(0.50)), "b": built}
    assert data["transformers 5.17"]["torch"] == "2.11.0"
    assert data["transformers 5.17"]["types"]["a"]["sizes"]["2"]["result"] == "refused"
    assert report.verdict(built) == ("yes", "", "")
    assert report.verdict(refused) == ("no (N=2)", "refused", "N=2 refused: CaptureError: no")


def test_sweep_writes_the_markdown_and_readme_paragraph_from_the_json(sweep, tmp_path):
    """--write-markdown: one section per version in the markdown, naming the candidates not run yet;
    README's sweep paragraph names both versions and the rest of README stays as it was."""
    report = sweep.sweep_report
    path, readme = str(tmp_path / "sweep.json"), tmp_path / "README.md"
    readme.write_text(f"# fxtp\n\n{report.README_HEADING}\n\nold numbers\n\n## Performance\n\nfast\n")
    over = {**exact_size(0.70), "params_mean": 0.70, "biggest_replicated": "model.layers.0.mixer.in_proj.weight "
            "(0.40 of parameters): attention with q replicated"}
    row = sweep_row("a", N2=over, N3=exact_size(0.36), N4=exact_size(0.26))
    report.merge(path, report.Section("5.25.0", "2.13.0"), [row], candidates=["a", "z"])
    report.merge(path, report.Section("5.17.0", "2.11.0"), [{**sweep_row("a"), "skipped": "encoder-decoder"}])
    report.write_markdown(path, str(readme))
    text = (tmp_path / "sweep.md").read_text()
    assert "transformers 5.25.0 (torch 2.13.0): 1 types not run yet (z); 1 types, 0 skipped; of the 1 tried" in text
    assert "## transformers 5.25" in text and "## transformers 5.17" in text and "Skipped: encoder-decoder: a." in text
    assert ("| a | 4 | exact | exact | exact | 2.0e-07 | 0.70, 0.36, 0.26 | 2 | no (N=2) | "
            "N=2 params/rank 0.70, replicated "
            "model.layers.0.mixer.in_proj.weight (0.40 of parameters): attention with q replicated |") in text
    lines = readme.read_text().split("\n")
    assert lines[:4] == ["# fxtp", "", report.README_HEADING, ""]
    assert lines[-5:] == ["", "## Performance", "", "fast", ""]
    paragraph = " ".join(lines[4:-5])
    assert ("transformers 5.25.0 (torch 2.13.0): 1 types tried, 1 not run yet, 1 build, 1 exact at N=2, 3 and 4, "
            "none wrong; goal met by 0 of 1 (not: parameters replicated at N=2 1, ...).") in paragraph
    assert "transformers 5.17.0 (torch 2.11.0): 0 types tried, 0 build" in paragraph and "old numbers" not in paragraph


def test_sweep_keeps_the_world_sizes_a_timed_out_or_crashed_type_finished(sweep):
    """A type that hangs or crashes its worker after N=2 keeps its N=2 row; N=3 and 4 say why they
    are missing, and the next type gets a fresh worker."""
    partial = json.dumps(sweep_row("slow", N2=exact_size(0.5)))
    child = ("import sys, time\n"
             "for line in sys.stdin:\n"
             f"    print({sweep.sweep_worker.ROW!r} + {partial!r}, flush=True)\n"
             "    if line.strip() == 'crash': sys.exit('boom')\n"
             "    time.sleep(60)\n")
    worker = sweep.sweep_worker.Worker([sys.executable, "-c", child])
    missing = {"result": "error", "detail": "process: timed out after 1 s"}
    assert worker.measure("slow", 1, sweep.WORLD_SIZES)["sizes"] == {"2": exact_size(0.5), "3": missing, "4": missing}
    crashed = {"result": "error", "detail": "process: exited with 1: boom"}
    assert worker.measure("crash", 30, sweep.WORLD_SIZES)["sizes"] == {"2": exact_size(0.5), "3": crashed, "4": crashed}
    worker.close()
