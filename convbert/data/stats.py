"""`data_stats`: what a built dataset holds (examples, tokens, segments, length histogram, bytes per token)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convbert.data.dataset import PretrainingDataset, check_block_offsets, check_example_lengths, check_token_ids
from convbert.errors import ConvBertError

_CHUNK = 1 << 20


def _check_shard(shard, max_seq_length: int, vocab_size: int) -> None:
    """A full scan: the length table adds up to the tokens and agrees with the offset table, every example fits,
    every token id is in the vocab."""
    total = 0
    for s in range(0, shard.n_examples, _CHUNK):
        lens = shard.lengths[s : s + _CHUNK]
        check_example_lengths(shard, lens, max_seq_length)
        total += int(np.asarray(lens, dtype=np.int64).sum())
    if total != shard.n_tokens:
        raise ConvBertError(f"{shard.path}: shard is corrupt (its length table adds up to {total} tokens, "
                            f"the header says {shard.n_tokens})")
    check_block_offsets(shard)
    for s in range(0, shard.n_tokens, _CHUNK * 64):
        check_token_ids(shard, shard.tokens[s : s + _CHUNK * 64], vocab_size)


def data_stats(path: str | os.PathLike, bins: int | None = None) -> dict:
    """Statistics of the dataset folder `path`, read from the shards (streamed, flat memory)."""
    ds = PretrainingDataset(path)
    t = ds.max_seq_length
    if bins is None:  # (not given: 8 buckets, or one per length for datasets shorter than that)
        bins = min(8, t)
    if not 1 <= bins <= t:
        raise ConvBertError(f"--bins: expected 1..{t} (the dataset's max_seq_length), got {bins}")
    edges = np.linspace(0, t, bins + 1).round().astype(np.int64)
    edges[0] = 0
    hist = np.zeros(bins, dtype=np.int64)
    seq_lens = np.zeros(t + 1, dtype=np.int64)
    examples = tokens = single = two = empty_a = 0
    for shard in ds.shards:
        _check_shard(shard, t, ds.vocab_size)
        for s in range(0, shard.n_examples, _CHUNK):
            lens = np.asarray(shard.lengths[s : s + _CHUNK], dtype=np.int64)
            la, lb = lens[:, 0], lens[:, 1]
            has_b = lb > 0
            n = la + 2 + np.where(has_b, lb + 1, 0)
            examples += len(n)
            tokens += int(n.sum())
            two += int(has_b.sum())
            single += int((~has_b).sum())
            empty_a += int((la == 0).sum())
            seq_lens += np.bincount(n, minlength=t + 1)[: t + 1]
    ds.check_hashes()  # after the structural checks, whose messages say more
    for k in range(bins):
        lo, hi = edges[k], edges[k + 1]
        hist[k] = seq_lens[lo + 1 : hi + 1].sum() if k else seq_lens[: hi + 1].sum()
    m = ds.manifest
    disk = sum((Path(path) / s["file"]).stat().st_size for s in m["shards"])  # the shards, as build-data counts
    c = m["counts"]
    return {
        "path": str(path),
        "examples": examples,
        "tokens": tokens,
        "mean_length": tokens / examples if examples else 0.0,
        "max_seq_length": t,
        "single_segment": single,
        "two_segment": two,
        "single_segment_share": single / examples if examples else 0.0,
        "two_segment_share": two / examples if examples else 0.0,
        "empty_first_segment": empty_a,
        "full_length_share": float(seq_lens[t] / examples) if examples else 0.0,
        "length_histogram": [
            {"from": int(edges[k]) + 1, "to": int(edges[k + 1]), "examples": int(hist[k])}
            for k in range(bins)
        ],
        "shards": len(ds.shards),
        "bytes_on_disk": disk,
        "bytes_per_token": disk / tokens if tokens else None,
        # Files, archive members, JSONL records or parquet rows read; each is one document only with --docs files
        # (with blank-lines documents the builder does not count them).
        "sources": c.get("files"),
        "documents": c.get("files") if m["settings"].get("docs") == "files" else None,
        "invalid_utf8_replaced": c.get("invalid_utf8"),
        "binary_files_skipped": c.get("binary_skipped"),
        "settings": {k: m["settings"][k] for k in ("segment_rule", "docs", "seed", "lower_case", "strip_accents")},
        "vocab_size": m["vocab"]["size"],
        "token_dtype": m["token_dtype"],
    }


def short_examples_note(mean_length: float, max_seq_length: int, docs: str | None) -> str | None:
    """A note when examples fill less than half of max_seq_length on average: pre-training pads every example to
    full length, so most of its compute would go to padding. With blank-line documents the usual cause is a corpus
    whose blank lines separate paragraphs, not documents."""
    if not max_seq_length or mean_length >= 0.5 * max_seq_length:
        return None
    note = (f"examples average {mean_length:.1f} of {max_seq_length} tokens, so pre-training (which pads to "
            f"{max_seq_length}) would spend {100 * (1 - mean_length / max_seq_length):.0f} % of its compute on "
            "padding")
    if docs == "blank-lines":
        note += ("; every blank line ends a document here (--docs blank-lines): if they separate paragraphs of "
                 "longer documents, one document per file (--docs files) packs full examples")
    else:
        note += "; the documents are short (examples do not cross documents, as in the original builder)"
    return note


def format_stats(s: dict) -> str:
    lines = [
        f"dataset          {s['path']}",
        f"examples         {s['examples']:,}",
        f"tokens           {s['tokens']:,} (incl. [CLS]/[SEP]; mean length {s['mean_length']:.1f} of "
        f"{s['max_seq_length']})",
        f"single segment   {s['single_segment']:,} ({100 * s['single_segment_share']:.1f} %)",
        f"two segments     {s['two_segment']:,} ({100 * s['two_segment_share']:.1f} %)",
    ]
    if s["empty_first_segment"]:
        lines.append(f"empty segment A  {s['empty_first_segment']:,} ([CLS] [SEP] B [SEP], convbert-release rule)")
    bpt = s["bytes_per_token"]
    lines += [
        f"full length      {100 * s['full_length_share']:.1f} % of examples",
        f"on disk          {s['bytes_on_disk']:,} bytes in {s['shards']} shard(s), "
        f"{bpt:.3f} bytes/token ({s['token_dtype']} ids)" if bpt is not None else "on disk          0 bytes",
        "settings         " + ", ".join(f"{k}={v}" for k, v in s["settings"].items()),
        "length histogram (tokens incl. specials):",
    ]
    top = max((h["examples"] for h in s["length_histogram"]), default=0) or 1
    for h in s["length_histogram"]:
        share = h["examples"] / s["examples"] if s["examples"] else 0.0
        bar = "#" * round(40 * h["examples"] / top)
        lines.append(f"  {h['from']:>5}-{h['to']:<5} {h['examples']:>12,} {100 * share:5.1f} % {bar}")
    note = short_examples_note(s["mean_length"], s["max_seq_length"], s["settings"].get("docs"))
    if note and s["examples"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
