"""`train_vocab`: a BERT-style WordPiece vocabulary trained with HF `tokenizers`' WordPiece trainer.

The file lists, one per line: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0–4), then the alphabet (single characters,
by code point), their ``##`` continuation forms (by code point), then the learned pieces in the order they were
learned. Text is normalised exactly as `WordPieceTokenizer` does (lower-casing and accent stripping unless switched
off), so the vocabulary matches what the builder will look up.

Deterministic: the same corpus gives the same file, byte for byte. `tokenizers`' trainer alone does not: it numbers
the ``##`` forms in hash-map order, a different order in every process, and breaks ties between equally frequent
merges by those numbers, so two runs can learn different pieces (huggingface/tokenizers#1794). A first, cheap pass
of the trainer (no merges) finds the ``##`` forms; the real pass gets them, sorted, right after the special tokens,
so every number and every tie-break is fixed. The cost is one more read of the corpus.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convbert.data import tokenize as wordpiece
from convbert.data.corpus import iter_lines
from convbert.data.tokenize import SPECIAL_TOKENS, WordPieceTokenizer, python_lower
from convbert.errors import ConvBertError
from convbert.utils import check_output_location, write_text_atomic

MAX_VOCAB_SIZE = 2**22  # 4M pieces: far above any real vocabulary; the trainer aborts the process on absurd sizes


_MAX_WORD = wordpiece.MAX_INPUT_CHARS_PER_WORD  # a longer word is one [UNK]
_UNKNOWN_WORD = re.compile(r"[^\W_]{%d,}" % (_MAX_WORD + 1))  # a run of letters and digits no punctuation splits


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
    check_output_location(output)  # (before training, not when the vocab is written)
    if int(vocab_size) > MAX_VOCAB_SIZE:
        raise ConvBertError(f"--vocab-size: expected at most {MAX_VOCAB_SIZE:,}, got {vocab_size}")
    if int(min_frequency) < 0:
        raise ConvBertError(f"--min-frequency: expected 0 or more, got {min_frequency}")
    for p in inputs:
        if os.path.exists(output) and os.path.isfile(p) and os.path.samefile(p, output):
            raise ConvBertError(f"--output {output}: is one of the --input files; it would overwrite the corpus")
    counted = {"lines": 0}

    def lines():
        # The output is passed over inside an input folder: a second run would train on the first one's vocab.
        for line in iter_lines([str(p) for p in inputs], text_field=text_field, skip_files=[output]):
            counted["lines"] += 1
            line = python_lower(line) if lower_case else line  # as WordPieceTokenizer will read it
            # Words over 200 characters are [UNK] to the tokenizer; the trainer's merges are quadratic in a word's
            # length (a 300,000-character run took 30 s), for pieces no text would use.
            line = _UNKNOWN_WORD.sub(" ", line) if len(line) > _MAX_WORD else line
            if len(line) <= wordpiece.LONG_TEXT:
                yield line
            else:  # the trainer holds ~100 bytes per character of a line: a one-line 50 MB file took 5 GB.
                yield from wordpiece.space_bounded_pieces(line, wordpiece.LONG_TEXT)  # between words: same counts

    def trained(size: int, specials: list[str]) -> Tokenizer:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=_MAX_WORD))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=bool(strip_accents) and bool(lower_case),
            lowercase=bool(lower_case),
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=size,
            min_frequency=int(min_frequency),
            special_tokens=specials,
            limit_alphabet=int(limit_alphabet),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train_from_iterator(lines(), trainer=trainer)
        return tok

    # Pass 1 (no merges: the vocabulary is full from the start) gives the alphabet's ## forms, which pass 2 numbers
    # in sorted order ahead of everything it creates.
    first = trained(len(SPECIAL_TOKENS), list(SPECIAL_TOKENS))
    if counted["lines"] == 0:
        raise ConvBertError(f"empty corpus: no text in {', '.join(map(str, inputs))}; expected UTF-8 text")
    continuations = sorted(t for t in first.get_vocab() if _is_continuation_char(t))
    tok = trained(int(vocab_size), list(SPECIAL_TOKENS) + continuations)
    vocab = tok.get_vocab()
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if ordered[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):  # pragma: no cover - trainer contract
        raise ConvBertError("internal: the WordPiece trainer did not put the special tokens first")
    learned = ordered[len(SPECIAL_TOKENS):]
    if not learned:  # only characters the normaliser removes (zero-width, control, byte-order marks)
        raise ConvBertError(f"empty corpus: {', '.join(map(str, inputs))} holds no text the tokenizer keeps (only "
                            "whitespace or control, zero-width and format characters); expected UTF-8 text")
    alphabet = sorted(t for t in learned if len(t) == 1)
    continuations = sorted(t for t in learned if _is_continuation_char(t))
    rest = [t for t in learned if len(t) != 1 and not _is_continuation_char(t)]
    tokens = list(SPECIAL_TOKENS) + alphabet + continuations + rest
    write_text_atomic(output, "".join(t + "\n" for t in tokens))
    WordPieceTokenizer.from_vocab(output, lower_case=lower_case, strip_accents=strip_accents)  # sanity check
    return str(Path(output))


def _is_continuation_char(token: str) -> bool:
    return token.startswith("##") and len(token) == 3
