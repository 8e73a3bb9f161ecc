"""Local model directories: tiny T5, BART and GPT-2 models built from a config here, loaded the real way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from models.claims import ClaimedJob
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from tests.conftest import SAMPLE, sumfleet, transformers_engine
from tests.worker.longdoc import long_document
from worker.backends.base import Row
from worker.engine import GenerationParams

pytestmark = pytest.mark.model  # torch models, if tiny ones
PLAN = PromptPlan(TEMPLATES["one-sentence"])
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0, 1, 2, 3


def _tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `texts`; every input ends with </s>, like T5's and BART's."""
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def _texts() -> list[str]:
    rows = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    return [*rows, long_document(800), "summarize : Summarize the following article in one sentence"]


def _options(**options: Any) -> dict[str, Any]:
    """Config keywords as a mapping (transformers' stubs lack some keywords its configs take)."""
    return options


def _save(model, tokenizer, directory: Path) -> Path:
    # untrained weights would often pick </s> or <pad> first: keep them out so outputs are words
    model.generation_config = GenerationConfig(
        decoder_start_token_id=model.config.decoder_start_token_id,
        eos_token_id=1,
        pad_token_id=0,
        num_beams=2,
        suppress_tokens=[0, 1, 2, 3],
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    tokenizer = _tokenizer(_texts())
    config = T5Config(
        **_options(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return _save(T5ForConditionalGeneration(config), tokenizer, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    tokenizer = _tokenizer(_texts())
    config = BartConfig(
        **_options(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=3,
            decoder_start_token_id=1,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
        )
    )
    return _save(BartForConditionalGeneration(config), tokenizer, tmp_path_factory.mktemp("tiny-bart"))


def _jobs() -> list[ClaimedJob]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(rows[:3])]


def test_t5_loads_as_seq2seq_and_gets_its_prefix_not_the_template(t5_dir: Path) -> None:
    engine = transformers_engine(str(t5_dir), Settings(database_url="sqlite://", dtype="float32"))
    assert engine.backend.encoder_decoder
    assert type(engine.backend.model).__name__ == "T5ForConditionalGeneration"
    assert engine.backend.input_prefix == "summarize: "
    variant, ids = engine.prompter.encode(PLAN, "The council said the ferry would keep running.", 6)
    assert variant is None
    assert engine.backend.tokenizer.decode(ids) == "summarize : The council said the ferry would keep running ."
    config = engine.backend.generation_config(12)
    assert config.num_beams == 2 and config.max_new_tokens == 12  # the model's own settings, our length
    outcomes = {o.job_id: o for batch in engine.run(_jobs(), PLAN, GenerationParams(6)) for o in batch}
    assert len(outcomes) == 3
    for outcome in outcomes.values():
        assert outcome.error is None and outcome.summary
        assert outcome.output_tokens == 6 and outcome.prompt_variant is None


def test_bart_takes_the_document_bare_and_its_task_params_are_used(bart_dir: Path) -> None:
    config_path = bart_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["task_specific_params"] = {"summarization": {"num_beams": 3, "no_repeat_ngram_size": 2}}
    config_path.write_text(json.dumps(config))
    engine = transformers_engine(str(bart_dir), Settings(database_url="sqlite://", dtype="float32"))
    assert engine.backend.encoder_decoder and engine.backend.input_prefix == ""
    assert type(engine.backend.model).__name__ == "BartForConditionalGeneration"
    _, ids = engine.prompter.encode(PLAN, "The council said the ferry would keep running.", 5)
    assert engine.backend.tokenizer.decode(ids) == "The council said the ferry would keep running ."
    generation = engine.backend.generation_config(8)
    assert (generation.num_beams, generation.no_repeat_ngram_size) == (3, 2)
    # the context comes from the model's config: 128 encoder positions (the summary has its own)
    assert engine.prompter.room(5) == engine.prompter.room(100) == 128
    outcomes = [o for batch in engine.run(_jobs(), PLAN, GenerationParams(5, long_documents="truncate")) for o in batch]
    assert all(o.error is None and o.summary and o.output_tokens == 5 for o in outcomes), outcomes


def test_a_long_document_is_map_reduced_by_a_seq2seq_model(bart_dir: Path) -> None:
    engine = transformers_engine(str(bart_dir), Settings(database_url="sqlite://", dtype="float32", max_new_tokens=8))
    long = ClaimedJob(9, "long", long_document(5000), 1)
    (outcome,) = [o for batch in engine.run([long], PLAN, GenerationParams(8)) for o in batch]
    assert outcome.error is None and outcome.summary
    assert outcome.pieces is not None and outcome.pieces > 40  # ~5,000 words in pieces of ~100 tokens
    assert outcome.levels is not None and outcome.levels >= 3


def test_sumfleet_run_with_a_local_seq2seq_model(t5_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'run.db'}", dtype="float32", max_input_tokens=64)
    done = sumfleet(
        "run", str(SAMPLE), "--model", str(t5_dir), "--max-new-tokens", "4", "-o", str(output), settings=settings
    )
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == len(SAMPLE.read_text().splitlines())
    assert all(r["status"] == "succeeded" and r["summary"] for r in rows)
    # tokens generated count every level: 4 for a document summarized whole, more for a split one
    assert all(r["output_tokens"] == 4 if r["pieces"] == 1 else r["output_tokens"] > 4 for r in rows)
    assert any(r["pieces"] > 1 for r in rows)  # 64 tokens of context: the longer sample stories are split
    assert all(r["pieces"] >= 1 and r["levels"] >= 1 for r in rows)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A decoder-only model with 256 learned positions: past them, its embedding lookup fails."""
    tokenizer = _tokenizer(_texts())  # decoder-only prompts are encoded without the </s> it appends
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1
    )
    model = GPT2LMHeadModel(config)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_truncation_leaves_room_for_the_batchs_own_output_on_a_real_model(gpt2_dir: Path) -> None:
    """Regression: the room for the prompt came from the worker's SUMFLEET_MAX_NEW_TOKENS (8), not
    the batch's max_new_tokens (40): prompt 248 + 40 new tokens ran past the 256 positions."""
    engine = transformers_engine(str(gpt2_dir), Settings(database_url="sqlite://", dtype="float32", max_new_tokens=8))
    assert engine.backend.context_length == 256
    with pytest.raises(IndexError):  # the failure the old room led to, on this very model
        engine.backend.generate([Row([5] * 248, 40)])
    job = ClaimedJob(1, "long", long_document(800), 1)
    (outcome,) = [o for batch in engine.run([job], PLAN, GenerationParams(40, "truncate")) for o in batch]
    assert outcome.error is None, outcome.error
    assert outcome.prompt_tokens is not None and outcome.prompt_tokens + 40 <= 256
