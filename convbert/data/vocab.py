"""`train_vocab`: a BERT-style WordPiece vocabulary trained with HF `tokenizers`' WordPiece trainer.

The file lists, one per line: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0–4), then the initial alphabet (single
characters and their ``##`` continuation forms, as the trainer produces them), then the learned pieces in the
order they were learned. Text is normalised exactly as `WordPieceTokenizer` does (lower-casing and accent
stripping unless switched off), so the vocabulary matches what the builder will look up.
"""

from __future__ import annotations

import os
from pathlib import Path

from convbert.data.corpus import iter_lines
from convbert.data.tokenize import SPECIAL_TOKENS, WordPieceTokenizer
from convbert.errors import ConvBertError
from convbert.utils import write_text_atomic


def train_vocab(
    inputs: list[str],
    vocab_size: int,
    output: str,
    lower_case: bool = True,
    strip_accents: bool = True,
    *,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
    text_field: str = "text",
) -> str:
    """Train a WordPiece vocabulary on the corpus and write it to `output`; returns the path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    if int(vocab_size) < len(SPECIAL_TOKENS) + 1:
        raise ConvBertError(f"--vocab-size: expected at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    if os.path.isdir(output):
        raise ConvBertError(f"--output {output}: is a folder; expected a file path such as {output}/vocab.txt")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=200))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=bool(strip_accents) and bool(lower_case),
        lowercase=bool(lower_case),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=int(limit_alphabet),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    counted = {"lines": 0}

    def lines():
        for line in iter_lines([str(p) for p in inputs], text_field=text_field):
            counted["lines"] += 1
            yield line

    tok.train_from_iterator(lines(), trainer=trainer)
    if counted["lines"] == 0:
        raise ConvBertError(f"empty corpus: no text in {', '.join(map(str, inputs))}; expected UTF-8 text")
    vocab = tok.get_vocab()
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in ordered]
    if tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):  # pragma: no cover - trainer contract
        raise ConvBertError("internal: the WordPiece trainer did not put the special tokens first")
    write_text_atomic(output, "".join(t + "\n" for t in tokens))
    WordPieceTokenizer.from_vocab(output, lower_case=lower_case, strip_accents=strip_accents)  # sanity check
    return str(Path(output))
