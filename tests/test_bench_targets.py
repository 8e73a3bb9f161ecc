"""bench/engines.py's targets: ratios computed from the runs it measured, over the run and per round."""

from __future__ import annotations

from typing import Any

from bench.engines import targets


def _run(variant: str, round_number: int, seconds: float, rss: float = 400.0) -> dict[str, Any]:
    return {"variant": variant, "round": round_number, "seconds": seconds, "peak_rss_mib": rss}


def test_ratios_over_the_run_and_per_round() -> None:
    runs = [
        _run("pipeline-one-at-a-time", 1, 60.0),
        _run("llama.cpp-alone", 1, 20.0),
        _run("engine-transformers", 1, 10.0, rss=1700.0),
        _run("system", 1, 11.0),
        _run("pipeline-one-at-a-time", 2, 66.0),
        _run("llama.cpp-alone", 2, 30.0),
        _run("engine-transformers", 2, 12.0, rss=1750.0),
        _run("system", 2, 12.0),
    ]
    found = targets(runs, "engine-transformers", docs=24)
    peer = found["auto_vs_fastest_peer"]
    assert peer["of"] == "engine-transformers / llama.cpp-alone"  # 50 s in all against the pipeline's 126 s
    assert peer["ratio"] == round(50 / 22, 3) and peer["per_round"] == [2.0, 2.5] and peer["met"]
    pipeline = found["auto_vs_pipeline_one_at_a_time"]
    assert pipeline["ratio"] == round(126 / 22, 3) and pipeline["per_round"] == [6.0, 5.5]
    assert not pipeline["met"]  # 5.7x over the run, though round 1 alone reached 6x
    system = found["system_vs_auto"]
    assert system["ratio"] == round(22 / 23, 3) and system["per_round"] == [round(10 / 11, 3), 1.0]
    assert system["met"]  # 0.957 over the run, 0.909 in round 1
    assert found["auto_peak_rss_mib"] == {"peak": 1750.0, "target": 512, "met": False}


def test_targets_left_out_where_their_variants_did_not_run() -> None:
    runs = [_run("engine-llama.cpp", 1, 17.0, rss=434.0), _run("system", 1, 20.0)]
    found = targets(runs, "engine-llama.cpp", docs=24)
    assert set(found) == {"auto", "system_vs_auto", "auto_peak_rss_mib"}
    assert not found["system_vs_auto"]["met"]  # 0.85
    assert found["auto_peak_rss_mib"]["met"]
    assert targets(runs, "engine-transformers", docs=24) == {"auto": "engine-transformers"}
