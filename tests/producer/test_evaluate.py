"""Tests for ROUGE evaluation in `producer.evaluate` (small fixtures, bootstrap=200)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rouge_score import rouge_scorer

from models.errors import ConfigError, InputError
from models.scoring import lcs_positions, lsum_f1, make_tokenizer, score_summaries
from models.scoring import rouge_lsum as rouge_lsum_of
from models.text import lead, sentences_of
from producer.evaluate import (
    CharTokenizer,
    EvalReport,
    Pair,
    Score,
    evaluate,
    pairs_from_files,
    pairs_from_rows,
)
from tests.conftest import SAMPLE

B = 200
TYPES = ("rouge1", "rouge2", "rougeL")

DOC_EN = (
    "The river flooded the old mill on Monday. Volunteers moved sandbags all night. "
    "The mayor thanked them on Tuesday. Repairs will take a month. Tourists stayed away."
)
LEAD_EN = (
    "The river flooded the old mill on Monday. Volunteers moved sandbags all night. The mayor thanked them on Tuesday."
)
DOC_ZH = "今天天气很好。我们一起去公园散步。孩子们在草地上放风筝。傍晚我们回家吃饭。"
LEAD_ZH = "今天天气很好。我们一起去公园散步。孩子们在草地上放风筝。"


def mids(scores: dict[str, Score] | None) -> tuple[float, ...]:
    assert scores is not None
    return tuple(round(scores[t].mid, 6) for t in TYPES)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# -- scoring -----------------------------------------------------------------------------------


def test_identical_summary_scores_one() -> None:
    text = "Volunteers moved sandbags to save the old mill."
    report = evaluate([Pair("a", text, text, None, None)], bootstrap=B)
    assert report.language == "en"
    assert mids(report.system) == (1.0, 1.0, 1.0)
    assert report.lead3 is None and report.n == 1 and report.failed == 0


def test_rouge1_hand_computed() -> None:
    # Reference unigrams: the, cat, sat, down; summary: the, dog, sat, up. 2 of 4 overlap, so
    # P = R = F1 = 0.5. No bigram is shared; the longest common subsequence is "the sat".
    report = evaluate([Pair("a", "The dog sat up.", "The cat sat down.", None, None)], bootstrap=B)
    assert mids(report.system) == (0.5, 0.0, 0.5)


def test_rouge1_unequal_lengths_and_stemming() -> None:
    # Summary 3 tokens, reference 6; "running" and "runs" both stem to "run".
    # Overlap: run, fast -> P = 2/3, R = 2/6, F1 = 2PR/(P+R) = 4/9.
    pair = Pair("a", "dogs runs fast", "the cat is running very fast", None, None)
    report = evaluate([pair], bootstrap=B)
    assert report.system["rouge1"].mid == pytest.approx(4 / 9)


def test_chinese_is_scored_on_characters() -> None:
    ref, summ = "今天天气很好。", "今天天气不错！"
    # Characters (punctuation dropped): 今 天 天 气 很 好 vs 今 天 天 气 不 错.
    # Unigrams: 4 of 6 shared -> 2/3. Bigrams: 今天 天天 天气 of 5 -> 3/5. LCS 今天天气 -> 2/3.
    report = evaluate([Pair("a", summ, ref, None, None)], bootstrap=B)
    assert report.language == "zh"
    assert mids(report.system) == (round(2 / 3, 6), 0.6, round(2 / 3, 6))
    # rouge_score's default tokenizer keeps only [a-z0-9], so it sees no token at all here.
    default = rouge_scorer.RougeScorer(list(TYPES), use_stemmer=True).score(ref, summ)
    assert all(default[t].fmeasure == 0.0 for t in TYPES)
    # Forcing English scoring gives the same useless zeros.
    english = evaluate([Pair("a", summ, ref, None, None)], language="en", bootstrap=B)
    assert mids(english.system) == (0.0, 0.0, 0.0)


def test_char_tokenizer() -> None:
    assert CharTokenizer().tokenize("GDP增长５%， ok") == ["g", "d", "p", "增", "长", "5", "o", "k"]


def test_language_detection() -> None:
    zh = Pair("z", "今天", "今天天气很好", None, None)
    en = Pair("e", "the weather", "The weather is fine today in the city.", None, None)
    fr = Pair("f", "il fait beau", "Il fait très beau aujourd'hui dans la ville.", None, None)
    assert evaluate([zh, zh, en], bootstrap=0).language == "zh"
    assert evaluate([zh, en, en], bootstrap=0).language == "en"
    assert evaluate([fr, fr, en], bootstrap=0).language == "words"  # Unicode words, unstemmed
    assert evaluate([en], language="zh", bootstrap=0).language == "zh"


def test_bootstrap_interval() -> None:
    pairs = [
        Pair(str(i), s, "the quick brown fox jumps over the lazy dog", None, None)
        for i, s in enumerate(
            [
                "the quick brown fox",
                "a lazy dog",
                "the fox jumps over the dog",
                "nothing relevant here",
                "quick brown fox jumps over the lazy dog",
                "the dog",
            ]
        )
    ]
    first = evaluate(pairs, bootstrap=B, seed=7)
    again = evaluate(pairs, bootstrap=B, seed=7)
    other = evaluate(pairs, bootstrap=B, seed=8)
    assert first.system == again.system  # deterministic for a fixed seed
    assert first.system != other.system
    for t in TYPES:
        s = first.system[t]
        assert s.low <= s.mid <= s.high
        assert s.low < s.high  # the scores differ, so the interval has width
        assert s.mid == pytest.approx(other.system[t].mid)  # mid is the plain mean
    no_resampling = evaluate(pairs, bootstrap=0)
    assert all(s.low == s.mid == s.high for s in no_resampling.system.values())


def test_lead3_from_documents() -> None:
    assert lead(DOC_EN, 3) == LEAD_EN
    en = evaluate([Pair("e", "Repairs will take a month.", LEAD_EN, DOC_EN, None)], bootstrap=B)
    assert mids(en.lead3) == (1.0, 1.0, 1.0)
    assert en.system["rouge1"].mid < 1.0 and en.lead3_n == 1
    # Chinese documents are split on 。！？ and scored on characters.
    assert lead(DOC_ZH, 3) == LEAD_ZH
    zh = evaluate([Pair("z", "傍晚回家。", LEAD_ZH, DOC_ZH, None)], bootstrap=B)
    assert zh.language == "zh" and mids(zh.lead3) == (1.0, 1.0, 1.0)
    off = evaluate([Pair("e", "x y", LEAD_EN, DOC_EN, None)], with_lead=False, bootstrap=B)
    assert off.lead3 is None


def test_lead3_only_where_documents_are_known() -> None:
    pairs = [
        Pair("a", LEAD_EN, LEAD_EN, DOC_EN, None),
        Pair("b", LEAD_EN, LEAD_EN, None, None),
    ]
    report = evaluate(pairs, bootstrap=B)
    assert report.n == 2 and report.lead3_n == 1
    assert "Lead-3 is scored on the 1 documents" in report.table()


def test_groups_split() -> None:
    ref = "the cat sat down"
    pairs = [
        Pair("1", ref, ref, DOC_EN, "news"),
        Pair("2", "the dog sat up", ref, DOC_EN, "sport"),
        Pair("3", ref, ref, DOC_EN, "news"),
        Pair("4", "the dog sat up", ref, DOC_EN, None),  # overall only
    ]
    report = evaluate(pairs, group_field="category", bootstrap=B)
    assert set(report.groups) == {"news", "sport"}
    assert report.groups["news"]["n"] == 2 and report.groups["sport"]["n"] == 1
    assert mids(report.groups["news"]["system"]) == (1.0, 1.0, 1.0)
    assert mids(report.groups["sport"]["system"]) == (0.5, 0.0, 0.5)
    assert report.n == 4
    assert report.system["rouge1"].mid == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert report.groups["news"]["lead3"] is not None


def test_failed_summaries_score_zero() -> None:
    ref = "volunteers saved the mill"
    pairs = [
        Pair("1", ref, ref, None, "a"),
        Pair("2", "", ref, None, "a"),
        Pair("3", "   ", ref, None, "b"),
    ]
    report = evaluate(pairs, bootstrap=B)
    assert report.n == 3 and report.failed == 2
    assert report.system["rouge1"].mid == pytest.approx(1 / 3)
    assert report.groups["a"]["failed"] == 1 and report.groups["b"]["failed"] == 1
    data = report.as_dict()
    assert data["failed"] == 2 and data["groups"]["b"]["failed"] == 1
    assert "2 of 3 summaries are empty (failed jobs) and score 0" in report.table()


def test_as_dict_is_json() -> None:
    ref = "the cat sat down"
    report = evaluate([Pair("1", ref, ref, DOC_EN, "news")], group_field="category", bootstrap=B)
    data = json.loads(json.dumps(report.as_dict()))
    assert data["n"] == 1 and data["language"] == "en" and data["group_field"] == "category"
    assert data["system"]["rouge2"] == {"low": 1.0, "mid": 1.0, "high": 1.0}
    assert set(data["lead3"]) == {*TYPES, "rougeLsum"}
    assert data["system"]["rougeLsum"] == {"low": 1.0, "mid": 1.0, "high": 1.0}
    assert data["groups"]["news"]["system"]["rougeL"]["mid"] == 1.0


def test_table() -> None:
    ref = "the cat sat down"
    pairs = [
        Pair("1", ref, ref, DOC_EN, "local news"),
        Pair("2", "the dog sat up", ref, DOC_EN, "sport"),
    ]
    text = evaluate(pairs, group_field="category", bootstrap=B).table()
    lines = text.splitlines()
    assert "category" in lines[1] and "ROUGE-1" in lines[1] and "ROUGE-L" in lines[1]
    assert any(line.startswith("overall") and "75.00 [" in line for line in lines)
    local = next(line for line in lines if line.startswith("local news"))
    assert "system" in local and "100.00 [100.00, 100.00]" in local
    sport = next(line for line in lines if line.startswith("sport"))
    assert "50.00 [50.00, 50.00]" in sport and "0.00 [0.00, 0.00]" in sport
    assert sum("Lead-3" in line for line in lines) == 3  # overall + 2 groups
    for label in ("ROUGE-1", "ROUGE-2", "ROUGE-L"):  # fixed width: every cell under its head
        pos = lines[1].index(label)
        assert all(line[pos - 2 : pos] == "  " and line[pos].isdigit() for line in lines[2:8])


# -- ROUGE-Lsum --------------------------------------------------------------------------------


def lsum(summary: str, reference: str) -> tuple[float, float]:
    """(ROUGE-L, ROUGE-Lsum) F1 of one pair."""
    report = evaluate([Pair("a", summary, reference, None, None)], bootstrap=0)
    return report.system["rougeL"].mid, report.system["rougeLsum"].mid


def test_rouge_lsum_credits_sentences_in_another_order() -> None:
    # Reference the cat sat | the dog ran; summary the dog ran | the cat sat (6 tokens each).
    # ROUGE-L: one LCS over the whole texts, "the dog ran" (or "the cat sat"): 3 -> P = R = F1 = 1/2.
    # ROUGE-Lsum: reference sentence 1 shares all 3 tokens with summary sentence 2, sentence 2 all
    # 3 with summary sentence 1: 6 hits -> P = R = F1 = 1.
    assert lsum("The dog ran. The cat sat.", "The cat sat. The dog ran.") == (0.5, 1.0)
    # The same in Chinese, on characters: 今天下雨 | 我们在家 swapped; ROUGE-L 4 of 8, ROUGE-Lsum 8 of 8.
    assert lsum("我们在家。今天下雨。", "今天下雨。我们在家。") == (0.5, 1.0)


def test_rouge_lsum_hand_computed_with_unequal_lengths() -> None:
    # Reference (10 tokens): the cat sat on the mat | a dog ran off. Summary (6): a dog ran | the cat sat.
    # ROUGE-L: LCS 3 ("the cat sat") -> P = 3/6, R = 3/10, F1 = 2PR/(P+R) = 0.375.
    # ROUGE-Lsum: "the cat sat" from the first reference sentence, "a dog ran" from the second:
    # 6 hits -> P = 6/6, R = 6/10, F1 = 0.75. (No word is over 3 letters: nothing is stemmed.)
    rouge_l, rouge_lsum = lsum("a dog ran. the cat sat.", "the cat sat on the mat. a dog ran off.")
    assert rouge_l == pytest.approx(0.375) and rouge_lsum == pytest.approx(0.75)


def test_rouge_lsum_is_a_union_of_lcs_per_reference_sentence() -> None:
    # One reference sentence, the cat and the dog ran off (7 tokens); summary the cat ran | the dog sat (6).
    # ROUGE-L: LCS "the cat the dog" = 4 -> P = 4/6, R = 4/7, F1 = 8/13.
    # ROUGE-Lsum: LCS with "the cat ran" is the(0) cat(1) ran(5); with "the dog sat" it is the(3) dog(4)
    # (read back from the ends, the later "the"); union the cat the dog ran = 5 hits -> P = 5/6, R = 5/7,
    # F1 = 10/13.
    rouge_l, rouge_lsum = lsum("the cat ran. the dog sat.", "the cat and the dog ran off")
    assert rouge_l == pytest.approx(8 / 13) and rouge_lsum == pytest.approx(10 / 13)
    ref, cand = ["the", "cat", "and", "the", "dog", "ran", "off"], ["the", "dog", "sat"]
    assert lcs_positions(ref, cand) == [3, 4]
    assert rouge_lsum_of([ref], [["the", "cat", "ran"], cand]) == pytest.approx(10 / 13)
    assert rouge_lsum_of([ref], []) == 0.0 and rouge_lsum_of([[]], [cand]) == 0.0


def test_rouge_lsum_agrees_with_the_rouge_score_package() -> None:
    """Cross-check against `rouge_score`'s rougeLsum, given the same sentences one per line."""
    documents = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    package = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    tokenizer = make_tokenizer("en")
    checked = 0
    for number, document in enumerate(documents):
        sentences = sentences_of(document)
        reference = " ".join(sentences[:3])
        candidates = [
            " ".join(reversed(sentences[1:5])),
            " ".join(sentences[2:4]) + " " + documents[(number + 1) % len(documents)][:200],
            " ".join(s[: len(s) // 2] + "." for s in sentences[:4]),
        ]
        for candidate in candidates:
            one_per_line = ["\n".join(sentences_of(text)) for text in (reference, candidate)]
            expected = package.score(*one_per_line)["rougeLsum"].fmeasure
            assert lsum_f1(tokenizer, reference, candidate) == pytest.approx(expected, abs=1e-12)
            checked += 1
    assert checked == 3 * len(documents)


def test_rouge_lsum_in_table_json_bootstrap_and_lead3() -> None:
    pairs = [
        Pair("1", "The dog ran. The cat sat.", "The cat sat. The dog ran.", DOC_EN, "news"),
        Pair("2", "a dog ran. the cat sat.", "the cat sat on the mat. a dog ran off.", DOC_EN, "news"),
    ]
    report = evaluate(pairs, group_field="category", bootstrap=B)
    assert report.system["rougeLsum"].mid == pytest.approx((1.0 + 0.75) / 2)
    assert report.system["rougeL"].mid == pytest.approx((0.5 + 0.375) / 2)
    s = report.system["rougeLsum"]
    assert s.low <= s.mid <= s.high and s.low < s.high  # its own bootstrap interval
    assert report.lead3 is not None and "rougeLsum" in report.lead3
    assert "rougeLsum" in report.groups["news"]["system"]
    lines = report.table().splitlines()
    assert lines[1].split()[-4:] == ["ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]
    overall = next(line for line in lines if line.startswith("overall"))
    assert overall.endswith("87.50 [75.00, 100.00]")
    assert any("ROUGE-Lsum: sentences split first, union LCS per reference sentence" in line for line in lines)
    pos = lines[1].index("ROUGE-Lsum")  # fixed width: the cells sit under their head
    assert all(line[pos].isdigit() for line in lines[2:6])
    data = json.loads(json.dumps(report.as_dict()))
    assert set(data["system"]) == {*TYPES, "rougeLsum"} and data["system"]["rougeLsum"]["mid"] == 0.875


def test_held_out_scores_carry_rouge_lsum() -> None:
    from producer.tuning_data import describe_scores

    scores = score_summaries(["The dog ran. The cat sat."], [(DOC_EN, "The cat sat. The dog ran.")])
    assert scores["system"]["rougeLsum"]["mid"] == 1.0 and scores["system"]["rougeL"]["mid"] == 0.5
    assert "rougeLsum" in scores["lead3"]
    system, lead3 = scores["system"], scores["lead3"]
    text = describe_scores({"n": 1, "zero_shot": system, "adapter": system, "lead3": lead3})
    assert "rougeLsum 100.00 [100.00, 100.00]" in text


def test_evaluate_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="no pairs"):
        evaluate([])
    with pytest.raises(InputError, match='id "x": the reference summary is empty'):
        evaluate([Pair("x", "a b", " ", None, None)])
    with pytest.raises(ConfigError, match='unknown language "fr"'):
        evaluate([Pair("x", "a b", "a b", None, None)], language="fr")
    with pytest.raises(ConfigError, match="bootstrap"):
        evaluate([Pair("x", "a b", "a b", None, None)], bootstrap=-1)


def test_report_is_a_dataclass_of_scores() -> None:
    report = evaluate([Pair("x", "a b", "a b", None, None)], bootstrap=B)
    assert isinstance(report, EvalReport) and isinstance(report.system["rouge1"], Score)


# -- loading pairs -----------------------------------------------------------------------------


def corpus(tmp_path: Path) -> str:
    return write(
        tmp_path / "corpus.jsonl",
        jsonl(
            {"id": "a", "text": DOC_EN, "summary": LEAD_EN, "category": "news"},
            {"id": "b", "text": DOC_ZH, "summary": LEAD_ZH, "category": "life"},
            {"id": 3, "text": DOC_EN, "summary": "Repairs take a month."},
        ),
    )


def test_pairs_from_files(tmp_path: Path) -> None:
    results = write(
        tmp_path / "results.jsonl",
        jsonl(
            {"id": "b", "summary": "今天天气很好。", "status": "succeeded"},
            {"id": "a", "summary": None, "status": "failed", "error": "timeout"},
            {"id": 3, "summary": "Repairs take a month.", "status": "succeeded"},
        ),
    )
    pairs = pairs_from_files(results, corpus(tmp_path), group_field="category")
    assert [p.id for p in pairs] == ["b", "a", "3"]  # the results' order; ids as strings
    assert pairs[0] == Pair("b", "今天天气很好。", LEAD_ZH, DOC_ZH, "life")
    assert pairs[1].summary == "" and pairs[2].group is None
    report = evaluate(pairs, group_field="category", bootstrap=B)
    assert report.failed == 1 and set(report.groups) == {"news", "life"}


def test_pairs_from_csv_files(tmp_path: Path) -> None:
    refs = write(
        tmp_path / "refs.csv",
        'id,article,highlights\na,"The mill flooded. Sandbags helped.",The mill flooded.\n',
    )
    results = write(
        tmp_path / "results.csv",
        'id,summary,status\na,"The mill\nflooded.",succeeded\n',
    )
    (pair,) = pairs_from_files(results, refs, reference_field="highlights", text_field="article")
    doc = "The mill flooded. Sandbags helped."
    assert pair == Pair("a", "The mill\nflooded.", "The mill flooded.", doc, None)


def test_malformed_result_lines(tmp_path: Path) -> None:
    results = write(
        tmp_path / "results.jsonl",
        jsonl({"id": "a", "summary": "x"}) + "{not json\n" + jsonl([1], {"summary": "y"}, {"id": "a", "summary": "z"}),
    )
    with pytest.raises(InputError) as err:
        pairs_from_files(results, corpus(tmp_path))
    message = str(err.value)
    assert message.startswith("4 bad result row(s): ")
    assert f"{results}:2: malformed result line (malformed JSON: " in message
    assert f"{results}:3: malformed result line (expected a JSON object, got list)" in message
    assert f'{results}:4: malformed result line (no "id" field)' in message
    assert f'{results}:5: duplicate result id "a" (first at line 1)' in message
    assert len(err.value.problems) == 4

    one = write(tmp_path / "one.jsonl", jsonl({"id": "a", "summary": 5}))
    with pytest.raises(InputError) as err:
        pairs_from_files(one, corpus(tmp_path))
    assert str(err.value) == (f'{one}:1: malformed result line (field "summary" must be a string or null, got number)')


def test_result_ids_missing_from_references(tmp_path: Path) -> None:
    ids = ["a", "x1", "x2", "x3", "x4", "x5", "x6"]
    results = write(tmp_path / "results.jsonl", jsonl(*({"id": i, "summary": "s"} for i in ids)))
    refs = corpus(tmp_path)
    with pytest.raises(InputError) as err:
        pairs_from_files(results, refs)
    assert str(err.value) == (
        f'{results}: 6 result ids missing from {refs}: "x1" (line 2), "x2" (line 3), '
        '"x3" (line 4), "x4" (line 5), "x5" (line 6) and 1 more'
    )


def test_missing_id_mentions_unreadable_reference_rows(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.jsonl", jsonl({"id": "a", "text": DOC_EN, "summary": "s"}) + "oops\n")
    results = write(tmp_path / "results.jsonl", jsonl({"id": "2", "summary": "s"}))
    with pytest.raises(InputError) as err:
        pairs_from_files(results, refs)
    assert str(err.value) == (
        f'{results}: 1 result id missing from {refs}: "2" (line 1); 1 row of {refs} could not '
        f"be read, first {refs}:2: malformed JSON (Expecting value at column 1)"
    )


def test_reference_field_missing(tmp_path: Path) -> None:
    refs = write(
        tmp_path / "refs.jsonl",
        jsonl(
            {"id": "a", "text": DOC_EN, "summary": "ok"},
            {"id": "b", "text": DOC_EN, "title": "no summary here"},
            {"id": "c", "text": DOC_EN, "summary": ""},
            {"id": "d", "text": DOC_EN, "summary": ["a list"]},
        ),
    )
    results = write(tmp_path / "results.jsonl", jsonl({"id": "b", "summary": "s"}))
    with pytest.raises(InputError) as err:
        pairs_from_files(results, refs)
    assert str(err.value) == (f'{refs}:2: no reference field "summary" for id "b" (its fields: title)')
    results = write(tmp_path / "results.jsonl", jsonl(*({"id": i, "summary": "s"} for i in "abcd")))
    with pytest.raises(InputError) as err:
        pairs_from_files(results, refs)
    assert str(err.value) == (
        f'3 bad reference(s): {refs}:2: no reference field "summary" for id "b" (its fields: '
        f'title); {refs}:3: empty reference field "summary" for id "c"; '
        f'{refs}:4: reference field "summary" for id "d" must be a string, got list'
    )


def test_no_pairs(tmp_path: Path) -> None:
    results = write(tmp_path / "results.jsonl", "\n\n")
    with pytest.raises(InputError) as err:
        pairs_from_files(results, corpus(tmp_path))
    assert str(err.value) == f"{results}: no result rows; nothing to evaluate"
    with pytest.raises(InputError, match="no such file"):
        pairs_from_files(str(tmp_path / "nope.jsonl"), corpus(tmp_path))


def test_group_field_in_no_row(tmp_path: Path) -> None:
    results = write(tmp_path / "results.jsonl", jsonl({"id": "a", "summary": "s"}))
    refs = corpus(tmp_path)
    with pytest.raises(InputError) as err:
        pairs_from_files(results, refs, group_field="catgory")
    assert str(err.value) == f'{refs}: no row has the group field "catgory"'


def test_pairs_from_rows() -> None:
    rows: list[dict[str, Any]] = [
        {"id": "a", "summary": "the cat sat", "status": "succeeded"},
        {"id": 2, "summary": None, "status": "failed"},
    ]
    refs: dict[str, dict[str, Any]] = {
        "a": {"reference": "the cat sat", "document": DOC_EN, "group": "news"},
        "2": {"reference": "a dog", "document": None, "group": None},
    }
    pairs = pairs_from_rows(rows, refs)
    assert pairs == [
        Pair("a", "the cat sat", "the cat sat", DOC_EN, "news"),
        Pair("2", "", "a dog", None, None),
    ]
    with pytest.raises(InputError) as err:
        pairs_from_rows([{"id": f"m{i}", "summary": "s"} for i in range(7)], refs)
    assert str(err.value) == ('7 result ids with no reference: "m0", "m1", "m2", "m3", "m4" and 2 more')
    with pytest.raises(InputError, match='1 reference missing or empty: "a"'):
        pairs_from_rows(rows[:1], {"a": {"reference": ""}})
    with pytest.raises(InputError, match="no result rows"):
        pairs_from_rows([], refs)
