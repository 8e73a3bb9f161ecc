"""A tiny decoder-only chat model built from a config (random weights, a word-level tokenizer with a
chat template), saved as a local model directory: tuning and adapter tests run on it in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.prompts import TEMPLATES
from tests.conftest import SAMPLE

SPECIALS = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
TEMPLATE = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|>"


def corpus_pairs() -> list[tuple[str, str]]:
    """(document, reference) pairs from the sample corpus: the reference is the first sentence."""
    rows = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    return [(text, text.split(". ")[0] + ".") for text in rows]


def build(directory: Path, seed: int = 0) -> Path:
    texts = [d for d, _ in corpus_pairs()] + [TEMPLATES["one-sentence"]["en"]]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", chat_template=TEMPLATE
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
        initializer_range=0.4,  # large random weights: outputs depend on the input, so a soft prompt can steer them
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
