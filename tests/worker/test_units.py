"""Fast tests of the worker's pure parts: prompts, batch packing, the lead engine, model names."""

from __future__ import annotations

import pytest

from models.errors import ModelNotFoundError, PromptError
from models.settings import Settings
from worker.batching import plan_batches
from worker.engines.lead import lead
from worker.splitting import sentences_of as split_sentences
from worker.engines.loading import canonical_model, queue_for, resolve_model
from worker.prompts import TEMPLATES, PromptPlan, check_template, detect_language, render, resolve_prompt


def test_named_and_custom_prompts() -> None:
    one = resolve_prompt("one-sentence")
    assert one.variants["en"].startswith("Summarize the following article in one sentence:")
    assert one.variants["zh"].startswith("请将以下文章简化为一句话：")
    custom = resolve_prompt("Give a title to: {document}")
    assert (custom.name, custom.variants) == ("custom", {"*": "Give a title to: {document}"})
    for name, variants in TEMPLATES.items():
        assert set(variants) == {"en", "zh"}, name
        for template in variants.values():
            check_template(template)
            assert "DOC" in render(template, "DOC"), name


def test_language_detection_by_script() -> None:
    assert detect_language("The council voted on Tuesday.") == "en"
    assert detect_language("今天上午，市政府宣布将开通夜间渡轮。") == "zh"
    assert detect_language("今日の午前、市はフェリーの運航を発表しました。") == "ja"
    assert detect_language("오늘 오전 시는 야간 페리 운항을 발표했다.") == "ko"
    assert detect_language("Talks with 习近平 and 李强 ended on Friday in Beijing after three days.") == "en"
    assert detect_language("12345 !!!") == "en"


def test_plan_picks_the_variant_and_fills_values() -> None:
    plan = PromptPlan(TEMPLATES["paragraph"], values={"max_words": 30})
    variant, template, language = plan.for_document("这是一篇关于天气的文章。")
    assert variant == "zh" and plan.render(template, "正文", language).startswith("请用不超过30个字的一段话总结以下文章")
    variant, template, language = plan.for_document("An English article.")
    assert plan.render(template, "Body", language).startswith("Summarize the following article in one paragraph of at most 30 words")
    fixed = PromptPlan(TEMPLATES["headline"], language="zh")
    assert fixed.for_document("An English article.")[0] == "zh"
    japanese = PromptPlan(TEMPLATES["headline"])  # no Japanese variant: English is the fallback
    assert japanese.for_document("今日の午前、市はフェリーの運航を発表しました。")[0] == "en"
    custom = PromptPlan({"*": "In {language}, summarize: {document}"})
    variant, template, language = custom.for_document("今天上午，市政府宣布。")
    assert (variant, custom.render(template, "X", language)) == ("*", "In Chinese, summarize: X")


def test_rendering_keeps_the_documents_own_braces() -> None:
    assert render("Summarize {{briefly}}: {document}", "a {b} c") == "Summarize {briefly}: a {b} c"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("one-sentance", "unknown prompt template 'one-sentance'; known templates: bullets"),
        ("Summarize this: {doc}", r"unknown placeholder\(s\) \{doc\}; the known ones are \{document\}, \{language\}, \{max_words\}"),
        ("Summarize {document} for {audience}", r"unknown placeholder\(s\) \{audience\}"),
        ("Summarize {}", r"unknown placeholder\(s\) \{\}"),
        ("Summarize { document", "does not parse"),
        ("Summarize it {0!r}", "unknown placeholder"),
    ],
)
def test_bad_prompts_are_refused(spec: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        resolve_prompt(spec)


def test_template_without_document_placeholder() -> None:
    with pytest.raises(PromptError, match="no \\{document\\} placeholder"):
        check_template("Summarize it {{please}}")


def test_plan_batches_sorts_and_respects_the_budget() -> None:
    lengths = [50, 10, 30, 10, 100, 20]
    plan = plan_batches(lengths, max_new_tokens=10, budget=100, max_batch=8)
    assert sum(plan, []) == [1, 3, 5, 2, 0, 4]  # shortest first, ties by position
    for batch in plan:
        longest = max(lengths[i] for i in batch)
        assert (longest + 10) * len(batch) <= 100 or len(batch) == 1
    assert plan == [[1, 3, 5], [2], [0], [4]]


def test_plan_batches_caps_the_batch_size_and_keeps_oversize_documents() -> None:
    assert plan_batches([5] * 7, max_new_tokens=5, budget=10_000, max_batch=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_batches([500], max_new_tokens=64, budget=100, max_batch=4) == [[0]]
    assert plan_batches([], 8, 100, 4) == []


def test_lead_engine_sentences() -> None:
    text = 'First one. Second "quoted." Third?\nFourth line! Fifth.'
    assert split_sentences(text) == ["First one.", 'Second "quoted."', "Third?", "Fourth line!", "Fifth."]
    assert lead(text, 3) == 'First one. Second "quoted." Third?'
    assert lead("第一句。第二句！第三句？第四句。", 3) == "第一句。第二句！第三句？"
    assert lead("No ending punctuation", 3) == "No ending punctuation"


def test_model_names() -> None:
    settings = Settings()
    assert resolve_model("lead", settings).lead_sentences == 3
    assert resolve_model("lead-5", settings).lead_sentences == 5
    bundled = resolve_model("smollm2", settings)
    assert bundled.kind == "gguf" and bundled.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert canonical_model("SmolLM2-135M-Instruct") == "smollm2" and canonical_model("lead-3") == "lead"
    assert queue_for("smollm2") == "sumfleet.smollm2"
    assert queue_for("Org/Some Model") == "sumfleet.org-some-model"


@pytest.mark.parametrize(
    "name, message",
    [
        ("gpt-17", "unknown model 'gpt-17'"),
        ("nobody/no-such-model-xyz", "not in the local Hugging Face cache and downloads are off"),
        ("lead-0", "at least one sentence"),
    ],
)
def test_unknown_models_are_refused(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(name, Settings())


def test_model_directory_without_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelNotFoundError, match="neither config.json nor a .gguf file"):
        resolve_model(str(tmp_path), Settings())
