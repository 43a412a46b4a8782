"""WordPieceTokenizer against a small pure-Python model of the original basic tokenizer + WordPiece (spec §4.2)."""

import inspect
import json
import unicodedata

import pytest

from convbert.data.tokenize import WordPieceTokenizer
from convbert.errors import ConvBertError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---- reference model written from the spec's description (§4.2) ------------------------------------------------


def _is_punct(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def ref_words(text, lower=True, strip=True):
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = []
    for tok in "".join(out).split():
        if lower:
            tok = tok.lower()
        if lower and strip:  # the original strips accents only when lower-casing
            tok = "".join(c for c in unicodedata.normalize("NFD", tok) if unicodedata.category(c) != "Mn")
        cur = ""
        for ch in tok:
            if _is_punct(ch):
                if cur:
                    words.append(cur)
                words.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
    return words


def ref_wordpiece(word, vocab, max_chars=200):
    if len(word) > max_chars:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        found = None
        while start < end:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                found = sub
                break
            end -= 1
        if found is None:
            return ["[UNK]"]
        pieces.append(found)
        start = end
    return pieces


def ref_tokenize(text, vocab, lower=True, strip=True):
    return [p for w in ref_words(text, lower, strip) for p in ref_wordpiece(w, vocab)]


# ---- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_text():
    mods = [json, inspect, unicodedata, pytest]
    return "\n".join(inspect.getdoc(m) or "" for m in mods) + "\n" + "\n".join(
        inspect.getdoc(getattr(json, n)) or "" for n in ("dumps", "loads", "JSONDecoder")
    )


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, corpus_text):
    words = set()
    for w in ref_words(corpus_text):
        words.add(w)
    pieces = sorted(words)[:400]
    chars = sorted({c for w in words for c in w})
    tokens = SPECIALS + ["the", "caf", "##e", "£5", "hello", "world", "##s", "x" * 150] + chars + ["##" + c for c in chars]
    tokens += [p for p in pieces if p not in tokens]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_bytes("".join(t + "\r\n" for t in tokens).encode("utf-8"))  # CRLF like the released file
    return path


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_attributes_and_crlf(vocab_file):
    tok = WordPieceTokenizer.from_vocab(vocab_file)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab["the"] == 5 and "the\r" not in tok.vocab
    assert tok.vocab_size == len(vocab_file.read_text(encoding="utf-8").splitlines())


TRICKY = [
    "Hello, World! Café résumé naïve",
    "tab\tseparated\u00a0nbsp and\u3000ideographic space",
    "control\x00chars\x07 and \ufffd replacement \u200b zero-width",
    "curly ‘quotes’ “double” — dash … ellipsis £5 °C €",
    "中文字符 mixed with latin 漢字",
    "[SEP] [CLS] [MASK] are split like text",
    "x" * 150 + " " + "x" * 201 + " " + "a" * 199,
    "ÅNGSTRÖM Ǆ ﬁ ligature İstanbul",
    "private \ue000 use \U000f0000 \u2028 line sep \x85 nel",
    "don't stop-believing; e.g. (a) [b] {c} <d> @e #f $g %h ^i &j *k _l ~m `n |o \\p",
]


@pytest.mark.parametrize("lower,strip", [(True, True), (False, True), (True, False), (False, False)])
def test_matches_reference(vocab_file, corpus_text, lower, strip):
    tok = WordPieceTokenizer.from_vocab(vocab_file, lower_case=lower, strip_accents=strip)
    vocab = tok.vocab
    texts = TRICKY + [ln for ln in corpus_text.splitlines() if ln.strip()][:300]
    got = tok.encode_batch(texts)
    for text, ids in zip(texts, got):
        assert tok.decode(ids) == ref_tokenize(text, vocab, lower, strip), text
        assert tok.encode(text) == ids


def test_a_capital_sigma_at_a_word_end_lowers_to_the_final_form_as_python_does(tmp_path):
    """The original lower-cases with `str.lower`, which applies Unicode's Final_Sigma rule; HF's normaliser maps
    each character alone (ΟΔΟΣ -> οδοσ). BERT's vocab holds both σ and ς, so the ids differed."""
    tokens = SPECIALS + ["οδος", "οδοσ", "ας", "ασ", "σοφια", "ο", "δ", "σ", "ς", "α", "##ς", "##σ", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt")
    text = "ΟΔΟΣ ΑΣ. ΣΟΦΙΑ Σ ΟΔΟΣ.ΑΣ οδοσ"
    want = ref_tokenize(text, tok.vocab)
    # (in ΟΔΟΣ.ΑΣ the first Σ is not final: '.' is case-ignorable and a letter follows)
    assert tok.tokenize(text) == want == ["οδος", "ας", ".", "σοφια", "σ", "οδοσ", ".", "ας", "οδοσ"]
    assert tok.decode(tok.encode_batch([text, "no sigma here"])[0]) == want
    cased = WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt", lower_case=False)
    assert cased.tokenize("ΟΔΟΣ") == ["[UNK]"]  # not lower-cased at all


def test_word_length_limit_is_200(vocab_file):
    tok = WordPieceTokenizer.from_vocab(vocab_file)
    assert tok.decode(tok.encode("x" * 150)) == ["x" * 150]
    assert tok.decode(tok.encode("a" * 200))[0] != "[UNK]" or "a" not in tok.vocab
    assert tok.encode("a" * 201) == [tok.unk_id]


def test_empty_inputs(vocab_file):
    tok = WordPieceTokenizer.from_vocab(vocab_file)
    assert tok.encode("") == [] and tok.encode_batch([]) == [] and tok.encode_batch(["", " "]) == [[], []]


def test_missing_special_token_names_file_and_token(tmp_path):
    p = tmp_path / "bad_vocab.txt"
    p.write_text("[PAD]\n[UNK]\n[CLS]\n[MASK]\nhello\n", encoding="utf-8")
    with pytest.raises(ConvBertError, match=r"bad_vocab\.txt.*\[SEP\]"):
        WordPieceTokenizer.from_vocab(p)
    with pytest.raises(ConvBertError, match="not found"):
        WordPieceTokenizer.from_vocab(tmp_path / "nope.txt")


def test_duplicate_entries_keep_last_id(tmp_path):
    p = tmp_path / "dup.txt"
    p.write_text("\n".join(SPECIALS + ["a", "b", "a"]) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_vocab(p)
    assert tok.encode("a b") == [7, 6]
    assert tok.vocab_size == 8


def test_a_very_long_line_is_encoded_in_pieces_with_the_same_ids(vocab_file, corpus_text, monkeypatch):
    """Lines over 64k characters are cut at plain spaces (bounded memory); the ids must equal one-piece encoding,
    also around characters the normaliser removes or splits on (control characters, tabs, CJK, accents)."""
    import convbert.data.tokenize as tokenize

    tok = WordPieceTokenizer.from_vocab(vocab_file)
    awkward = " ".join(corpus_text.split()[:400]) + " a\x1cb c\td 中文 naïve\u3000x " + "y" * 300 + " end"
    line = (awkward + " ") * 3
    monkeypatch.setattr(tokenize, "LONG_TEXT", 97)  # many cuts, some inside runs without spaces
    pieces = list(tokenize.space_bounded_pieces(line, 97))
    assert len(pieces) > 50 and "".join(pieces) == line
    ids = tok.encode_batch(["short text", line, "another"])
    assert ids[1] == tok.backend.encode(line, add_special_tokens=False).ids
    assert ids[0] == tok.encode("short text") and ids[2] == tok.encode("another")


def test_many_texts_are_encoded_in_bounded_calls_with_the_same_ids(vocab_file, corpus_text, monkeypatch):
    """A GLUE split (391k texts) went to the backend in one call, every Encoding alive at once (+1.3 GB)."""
    import convbert.data.tokenize as tokenize

    tok = WordPieceTokenizer.from_vocab(vocab_file)
    words = corpus_text.split()
    texts = [" ".join(words[i : i + 1 + i % 13]) for i in range(100)] + ["ΟΔΟΣ Σ"]  # (final sigma: prepared once)
    whole = tok.encode_batch(texts)
    calls = []
    backend = tok._batch
    monkeypatch.setattr(tok, "_batch", lambda batch, **kw: calls.append(len(batch)) or backend(batch, **kw))
    monkeypatch.setattr(tokenize, "_BATCH_TEXTS", 7)
    assert tok.encode_batch(texts) == whole == [tok.encode(t) for t in texts]
    assert max(calls) <= 7 and sum(calls) == len(texts)


def test_a_vocab_path_that_is_not_a_regular_file_is_refused(tmp_path):
    for path in (tmp_path, "/dev/zero"):
        with pytest.raises(ConvBertError, match="not a regular file"):
            WordPieceTokenizer.from_vocab(path)


def test_long_text_without_spaces_is_cut_at_cjk_punctuation_and_other_whitespace_with_the_same_ids(
        vocab_file, monkeypatch):
    """Chinese or minified text has no U+0020 to cut at: pieces still stay bounded (a 10 MB line had taken ~2 GB),
    cut after an ideograph, punctuation or other whitespace, never before a combining mark or inside a word."""
    import random as _random

    import convbert.data.tokenize as tokenize

    tok = WordPieceTokenizer.from_vocab(vocab_file, lower_case=True, strip_accents=False)
    rng = _random.Random(0)
    alphabet = list("東京日本中文字") + ["e\u0301", "a", "b", ",", ".", "(", ")", "\u3000", "\t", "\u00a0", "\u200b",
                                           "—", "x" * 5]
    line = "".join(rng.choice(alphabet) for _ in range(4000))
    size = 50
    monkeypatch.setattr(tokenize, "LONG_TEXT", size)
    pieces = list(tokenize.space_bounded_pieces(line, size))
    assert "".join(pieces) == line and " " not in line
    assert len(pieces) > 60 and max(map(len, pieces)) <= size
    import unicodedata

    assert all(not unicodedata.category(p[0]).startswith("M") for p in pieces[1:])
    whole = tok.backend.encode(line, add_special_tokens=False).ids
    assert tok.encode_batch([line])[0] == whole
