"""Tiny models with a tokenizer, and small synthetic data sets, for the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.families import FAMILIES, LM_INIT

POSITIVE = "good great fine lovely happy superb".split()
NEGATIVE = "bad awful poor sad terrible ugly".split()
FILLER = "the a movie film was is it this and very".split()
WORDS = POSITIVE + NEGATIVE + FILLER
# task -> (model type, transformers class, extra config)
MODELS = {
    "sequence-classification": ("bert", "BertForSequenceClassification", LM_INIT),
    "token-classification": ("bert", "BertForTokenClassification", {**LM_INIT, "num_labels": 3}),
    "causal-lm": ("llama", "LlamaForCausalLM", LM_INIT),
}


def write_tokenizer(folder: Path, lm: bool) -> None:
    """A word-level tokenizer over WORDS (ids below 40, inside the tiny models' 1000): BERT-style [CLS] a [SEP]
    for the encoders, plain words and an end token for the causal LM."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not lm:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[EOS]",
    )  # fmt: skip
    fast.save_pretrained(folder)


def write_model(task: str, folder: Path) -> Path:
    """A tiny random model of `task` (config.json) with its tokenizer in `folder`; returns the config's path."""
    from transformers import AutoConfig

    model_type, cls, extra = MODELS[task]
    config = AutoConfig.for_model(model_type, **{**FAMILIES[model_type], **extra}, architectures=[cls])
    config.save_pretrained(folder)
    write_tokenizer(folder, lm=task == "causal-lm")
    return folder / "config.json"


def write_data(task: str, path: Path, rows: int = 32, seed: int = 0) -> Path:
    """Learnable rows: sentiment words decide a class (seq-cls), each word's tag (token-cls), or the LM's text."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(rows):
            y = i % 2
            words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if y else NEGATIVE, 2)
            rng.shuffle(words)
            if task == "sequence-classification":
                row = {"text": " ".join(words), "label": ["neg", "pos"][y]}
            elif task == "token-classification":
                tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
                row = {"tokens": words, "tags": tags}
            else:
                row = {"prompt": "this film was", "text": " ".join(words)}
            fh.write(json.dumps(row) + "\n")
    return path
