"""BERT WordPiece tokenisation (spec §4.2) on top of HF `tokenizers`.

The pipeline reproduces the original basic tokenizer + WordPiece:

* normaliser: drop NUL, U+FFFD and control characters, map whitespace to a space, put spaces around CJK
  ideographs, optionally lower-case and strip accents (NFD, drop combining marks). As in the original
  (ELECTRA's `BasicTokenizer`), accents are only stripped when lower-casing: `lower_case=False` keeps them;
* pre-tokeniser: split on whitespace and on punctuation (ASCII non-alphanumeric printable characters and every
  Unicode ``P*`` character);
* model: greedy longest-match-first WordPiece with ``##`` continuations; a word longer than **200** characters
  (the original's limit, not HF's default of 100) or one that cannot be segmented becomes ``[UNK]``.

Special-token strings such as ``[SEP]`` in raw text are split like any other text, as in the original (no
"never split" list). Vocabulary loading follows the original too: one token per line, surrounding whitespace
(including a CRLF line ending) stripped, the id is the line number, and a token listed twice keeps its last id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from convbert.errors import ConvBertError
from convbert.utils import decode_utf8

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_INPUT_CHARS_PER_WORD = 200


def load_vocab_lines(path: str | os.PathLike) -> list[str]:
    """Return the vocabulary file's tokens in line order (line i has id i)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a device such as /dev/zero that never ends
        raise ConvBertError(f"{path}: not a regular file (expected a BERT-style vocab.txt, one token per line)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConvBertError(f"{path}: vocabulary file not found (expected a BERT-style vocab.txt, one token per line)")
    except OSError as err:
        raise ConvBertError(f"{path}: cannot read vocabulary file ({err.strerror or err})")
    text = decode_utf8(raw, path, "vocabulary file is not valid UTF-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # trailing newline at end of file
        lines.pop()
    tokens = [line.strip() for line in lines]
    if not tokens:
        raise ConvBertError(f"{path}: vocabulary file is empty (expected one token per line)")
    return tokens


class WordPieceTokenizer:
    """BERT WordPiece tokenizer. Build it with :meth:`from_vocab`."""

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        lower_case: bool = True,
        strip_accents: bool = True,
        source: str = "<vocab>",
    ) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab[tok] = i  # duplicates keep their last id, like the original load_vocab
        for special in SPECIAL_TOKENS:
            if special not in vocab:
                raise ConvBertError(
                    f"{source}: vocabulary lacks the special token {special} "
                    f"(expected all of {' '.join(SPECIAL_TOKENS)})"
                )
        self.source = source
        self.lower_case = bool(lower_case)
        # As in the original BasicTokenizer, accents are stripped only when lower-casing.
        self.strip_accents = bool(strip_accents) and self.lower_case
        self.vocab: dict[str, int] = vocab
        self._id_to_token: list[str] = list(tokens)
        self.vocab_size: int = len(tokens)
        self.pad_id = vocab["[PAD]"]
        self.unk_id = vocab["[UNK]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]

        # An empty line in the vocab gets an id but can never be matched; keep it out of the model's table.
        model_vocab = {t: i for t, i in vocab.items() if t}
        tok = Tokenizer(
            models.WordPiece(model_vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        )
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=self.strip_accents,
            lowercase=self.lower_case,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok = tok
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self._prepare = python_lower if self.lower_case else _unchanged

    @classmethod
    def from_vocab(
        cls, path: str | os.PathLike, lower_case: bool = True, strip_accents: bool = True
    ) -> "WordPieceTokenizer":
        return cls(load_vocab_lines(path), lower_case=lower_case, strip_accents=strip_accents, source=str(path))

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (no special tokens, no post-processor)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(self._prepare(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text. With `max_tokens`, a text's ids may stop after its first `max_tokens` (only a
        text longer than `LONG_TEXT` characters is cut; the rest of it is not tokenised at all)."""
        texts = texts if isinstance(texts, list) else list(texts)
        if len(texts) > _BATCH_TEXTS:  # every Encoding of a call is alive at once: 391k texts held +1.3 GB
            return [ids for start in range(0, len(texts), _BATCH_TEXTS)
                    for ids in self.encode_batch(texts[start : start + _BATCH_TEXTS], max_tokens)]
        texts = [self._prepare(t) for t in texts]
        if not texts:
            return []
        # One batch for the ordinary lines. A very long line (a 10 MB "sentence") costs ~500 bytes per token inside
        # `tokenizers`; encoded in pieces cut at plain spaces, where a word boundary falls anyway, it gives the same
        # ids in bounded memory.
        long = [i for i, t in enumerate(texts) if len(t) > LONG_TEXT]
        out = [e.ids for e in self._batch([t if len(t) <= LONG_TEXT else "" for t in texts],
                                          add_special_tokens=False)]
        for i in long:
            ids: list[int] = []
            for piece in space_bounded_pieces(texts[i], LONG_TEXT):
                ids += self._batch([piece], add_special_tokens=False)[0].ids
                if max_tokens is not None and len(ids) >= max_tokens:
                    del ids[max_tokens:]
                    break
            out[i] = ids
        return out

    def tokenize(self, text: str) -> list[str]:
        return self.decode(self.encode(text))

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Token strings for `ids` (no detokenisation: ``##`` pieces are returned as they are)."""
        table = self._id_to_token
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(table):
                raise ConvBertError(f"token id {i} is outside the vocabulary {self.source} (size {len(table)})")
            out.append(table[i])
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"WordPieceTokenizer({self.source!r}, vocab_size={self.vocab_size}, lower_case={self.lower_case}, "
            f"strip_accents={self.strip_accents})"
        )


LONG_TEXT = 1 << 16  # characters
_BATCH_TEXTS = 8192  # texts per call of the backend: same ids, bounded memory (a GLUE split is 400k texts)
_CAPITAL_SIGMA = "\u03a3"


def python_lower(text: str) -> str:
    """Python's lower-casing where it differs from the normaliser's: a capital sigma at the end of a word becomes
    the final form ς (Unicode's Final_Sigma rule, which `str.lower` in the original applies and HF's per-character
    lower-casing does not: ΟΔΟΣ -> οδος, not οδοσ). Other text is left to the normaliser (the same result)."""
    return text.lower() if _CAPITAL_SIGMA in text else text


def _unchanged(text: str) -> str:
    return text


def space_bounded_pieces(text: str, size: int) -> Iterator[str]:
    """`text` cut into pieces of about `size` characters, only where BERT's normaliser and pre-tokeniser end a word
    whatever surrounds the cut: at U+0020 first, else after another whitespace character, a CJK ideograph or a
    punctuation mark (each a token of its own) that no combining mark follows. Text without spaces (Chinese,
    Japanese, minified code) is then cut too, so memory stays bounded; a run of `size` characters with no
    boundary at all is one word anyway (longer than 200 characters: [UNK])."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        if cut == -1:
            cut = _boundary_before(text, start + size, start + 1)
        if cut == -1:
            cut = text.find(" ", start + size)
            if cut == -1:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


_BOUNDARY_SCAN = 4096  # characters searched back for a boundary other than a space


def _boundary_before(text: str, end: int, lowest: int) -> int:
    """The largest i in [max(lowest, end - _BOUNDARY_SCAN), end] where a word ends between text[i-1] and text[i]."""
    import unicodedata

    for i in range(end, max(lowest, end - _BOUNDARY_SCAN) - 1, -1):
        if _ends_a_word(text[i - 1]) and not unicodedata.category(text[i]).startswith("M"):
            return i
    return -1


def _ends_a_word(c: str) -> bool:
    """Whitespace, a CJK ideograph or punctuation as BERT's basic tokenizer defines them."""
    import unicodedata

    if c in " \t\n\r":
        return True
    cp = ord(c)
    if (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F):
        return True
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    category = unicodedata.category(c)
    return category == "Zs" or category.startswith("P")
