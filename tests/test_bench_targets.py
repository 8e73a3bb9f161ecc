"""bench/engines.py's targets: ratios computed from the runs it measured, over the run and per round."""

from __future__ import annotations

from typing import Any

from bench.engines import ceiling, flops_per_doc, targets


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


def test_the_ceiling_counts_the_models_flops_and_sets_them_against_the_measured_matmul_rate() -> None:
    # one token read, nothing generated: 30 layers x (2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536) multiply-adds,
    # the output layer once (576 x 49,152) and attention over one position
    assert flops_per_doc(1, 0) == 2 * 106_168_320 + 2 * 576 * 49_152 + 2 * 576 * 30
    # attention grows with the square of the positions, the rest linearly
    assert flops_per_doc(400, 48) - flops_per_doc(400, 0) > 48 * 2 * (106_168_320 + 576 * 49_152)
    runs = [
        {**_run("pipeline-one-at-a-time", 1, 120.0), "prompt_tokens": 24 * 460, "output_tokens": 24 * 40},
        {**_run("engine-llama.cpp", 1, 30.0), "prompt_tokens": 24 * 460, "output_tokens": 24 * 40},
        {**_run("engine-llama.cpp", 2, 34.0), "prompt_tokens": 24 * 460, "output_tokens": 24 * 40},
    ]
    record = {"machine": {"matmul_gflops": {"float32": 100.0, "bfloat16": 1.0}}, "runs": runs}
    found = ceiling(record, "engine-llama.cpp", docs=24)
    most = 100e9 / flops_per_doc(460, 40)  # the faster of fp32 and bf16
    assert found["docs_per_s"] == round(most, 3) and 0.8 < most < 0.9
    assert found["auto_share"] == round(48 / 64 / most, 3)  # 0.75 docs/s over both rounds
    assert found["x_pipeline_one_at_a_time"] == round(most / 0.2, 2)  # the pipeline: 24 docs in 120 s
    assert ceiling({**record, "runs": runs[:1]}, "engine-llama.cpp", docs=24) == {}


def test_where_time_goes_names_nodes_and_tells_decoding_steps_from_prompts() -> None:
    from bench.where_time_goes import is_decoding_step, node_key, table

    assert node_key("ffn_up-17", "MUL_MAT") == "ffn_up (MUL_MAT)"  # all layers in one row
    assert node_key("result_output", "MUL_MAT") == "result_output (MUL_MAT)"
    assert node_key("node_617", "FLASH_ATTN_EXT") == "(FLASH_ATTN_EXT)"  # unnamed: by operation
    assert is_decoding_step([True] * 5, rows=8)  # one token per running row, each asking for logits
    assert not is_decoding_step([False] * 63 + [True], rows=8)  # a prompt read: logits at its end only
    assert not is_decoding_step([True] * 9, rows=8)  # more tokens than rows: not one step
    assert not is_decoding_step([], rows=8)
    rows = table({"a": 1.0, "b": 3.0, "c": 0.5}, limit=2)
    assert [r["what"] for r in rows] == ["b", "a"] and rows[0]["share"] == round(3 / 4.5, 3)
