"""ExampleBuilder against hand-computed cases for both segment rules (spec §4.4).

The RNG is scripted: every `random()` / `randint()` the builder draws is listed in the case, in order, so the
cases also pin down *when* the original draws (Python's short-circuit order).
"""

import random

import pytest

from convbert.data.packing import ExampleBuilder, layout
from convbert.errors import ConvBertError


class ScriptedRNG:
    def __init__(self, randoms, randints=()):
        self.randoms = list(randoms)
        self.randints = list(randints)
        self.int_calls = []

    def random(self):
        assert self.randoms, "builder drew more random() values than the hand computation"
        return self.randoms.pop(0)

    def randint(self, a, b):
        self.int_calls.append((a, b))
        assert self.randints, "builder drew an unexpected randint()"
        return self.randints.pop(0)

    def done(self):
        return not self.randoms and not self.randints


def line(start, n):
    return list(range(start, start + n))



def feed(builder, lines):
    out = []
    for ln in lines:
        ex = builder.add_line(ln)
        if ex is not None:
            out.append(ex)
    return out


# max_seq_length 16 -> target 16, A target (16 - 3) // 2 = 6, A cut at 14, B cut at 16 - len(A) - 3.


def test_electra_rule_coin_flip_then_b():
    l1, l2, l3, l4 = line(100, 3), line(200, 4), line(300, 5), line(400, 6)  # cumulative 3, 7, 12, 18 >= 16
    # draws: 0.5 (not single-segment) ; l2 overflows A -> coin 0.3 < 0.5 -> A ; l3: A over target, no draw -> B ;
    # l4 -> B ; next target: 0.9 -> stays 16
    rng = ScriptedRNG([0.5, 0.3, 0.9])
    b = ExampleBuilder(16, "electra", rng)
    exs = feed(b, [l1, l2, l3, l4])
    assert exs == [(l1 + l2, l3 + l4[:1])]  # B cut to 16 - 7 - 3 = 6 tokens
    assert rng.done() and b.target_length == 16 and b.pending == []


def test_electra_rule_coin_flip_fails_and_later_short_line_joins_a():
    l1, l2, l3, l4 = line(100, 2), line(200, 8), line(300, 3), line(400, 5)  # 2, 10, 13, 18
    # l1 -> A (A empty); l2: 2+8 >= 6, B empty, coin 0.6 -> B; l3: 2+3 < 6 -> A (no draw); l4: B non-empty -> B
    rng = ScriptedRNG([0.5, 0.6, 0.9])
    exs = feed(ExampleBuilder(16, "electra", rng), [l1, l2, l3, l4])
    assert exs == [(l1 + l3, l2)]  # B = l2 + l4 cut to 16 - 5 - 3 = 8 tokens = l2
    assert rng.done()


def test_electra_single_segment_case():
    l1, l2, l3, l4 = line(100, 3), line(200, 4), line(300, 5), line(400, 6)
    rng = ScriptedRNG([0.05, 0.9])  # < 0.1 -> A target 100000: every line fits in A, no coin flips
    exs = feed(ExampleBuilder(16, "electra", rng), [l1, l2, l3, l4])
    assert exs == [((l1 + l2 + l3 + l4)[:14], [])]
    assert rng.done()


def test_release_rule_everything_follows_a_nonempty_a():
    l1, l2, l3, l4 = line(100, 3), line(200, 4), line(300, 5), line(400, 6)
    rng = ScriptedRNG([0.5, 0.9])  # l1 fits -> A; A is then non-empty so all later lines go to A, no coin flips
    exs = feed(ExampleBuilder(16, "convbert-release", rng), [l1, l2, l3, l4])
    assert exs == [((l1 + l2 + l3 + l4)[:14], [])]
    assert rng.done()


def test_release_rule_long_first_line_goes_to_b_and_b_precedes_a():
    l1, l2, l3 = line(100, 7), line(200, 2), line(300, 8)  # 7, 9, 17
    # l1: A empty, 7 >= 6, B empty (falsy) -> B ; l2: 0+2 < 6 -> A ; l3: A non-empty -> A
    # next target: 0.01 < 0.05 -> randint(5, 16) -> 9
    rng = ScriptedRNG([0.5, 0.01], [9])
    b = ExampleBuilder(16, "convbert-release", rng)
    exs = feed(b, [l1, l2, l3])
    assert exs == [(l2 + l3, l1[:3])]  # B cut to 16 - 10 - 3 = 3
    assert rng.done() and rng.int_calls == [(5, 16)] and b.target_length == 9


def test_release_rule_coin_flip_with_nonempty_b():
    l1, l2, l3 = line(100, 7), line(200, 7), line(300, 3)  # 7, 14, 17
    # l1 -> B ; l2: A empty, 0+7 >= 6, B non-empty and 0 < 6 -> coin 0.7 fails -> B ; l3: 0+3 < 6 -> A
    rng = ScriptedRNG([0.5, 0.7, 0.9])
    exs = feed(ExampleBuilder(16, "convbert-release", rng), [l1, l2, l3])
    assert exs == [(l3, (l1 + l2)[:10])]
    assert rng.done()


def test_release_rule_single_long_line_gives_empty_a():
    l1 = line(100, 20)
    rng = ScriptedRNG([0.5, 0.9])
    exs = feed(ExampleBuilder(16, "convbert-release", rng), [l1])
    assert exs == [([], l1[:13])]  # [CLS] [SEP] B(13) [SEP] = 16
    ids, mask, seg = layout([], l1[:13], 1, 2, 16)
    assert ids[:2] == [1, 2] and ids[-1] == 2 and sum(mask) == 16 and seg == [0, 0] + [1] * 14
    # The fixed rule puts the same line into A instead.
    rng = ScriptedRNG([0.5, 0.9])
    assert feed(ExampleBuilder(16, "electra", rng), [l1]) == [(l1[:14], [])]


def test_short_target_changes_the_next_trigger_and_a_target_but_not_truncation():
    rng = ScriptedRNG([0.5, 0.01, 0.5, 0.5, 0.9], [9])
    b = ExampleBuilder(16, "electra", rng)
    l1, l2 = line(100, 16), line(200, 5)
    assert feed(b, [l1]) == [(l1[:14], [])]
    assert b.target_length == 9
    # next example is cut as soon as 9 tokens are pending; A target (9 - 3) // 2 = 3:
    # l2 -> A (A empty); l3: 5+5 >= 3, B empty, 5 < 3 false -> B (no coin flip)
    l3 = line(300, 5)
    assert b.add_line(l2) is None
    ex = b.add_line(l3)
    # draws used: 0.5 (A target), then 0.5 for the next target (>= 0.05 -> 16); 0.9 left over
    assert ex == (l2, l3)
    assert b.target_length == 16
    assert rng.randoms == [0.9]


def test_document_end_flushes_and_blank_quirk():
    rng = ScriptedRNG([0.5, 0.9])
    b = ExampleBuilder(16, "electra", rng)
    assert b.end_document() is None  # nothing pending: the original appends an empty line
    assert b.pending == [[]]
    l1 = line(100, 3)
    assert b.add_line(l1) is None
    assert b.end_document() == (l1, [])
    assert rng.done() and b.pending == []
    # A blank line inside a document (blank-lines mode) ends it the same way.
    rng = ScriptedRNG([0.5, 0.9])
    b = ExampleBuilder(16, "convbert-release", rng)
    b.add_line(l1)
    assert b.add_line([], blank=True) == (l1, [])
    # A non-blank line whose tokenisation is empty is kept as an empty pending line.
    assert b.add_line([]) is None and b.pending == [[]]


def test_truncation_limits():
    # A is cut at max_len - 2; B gets max(0, max_len - len(A) - 3), i.e. nothing when A is 125+ of 128.
    rng = ScriptedRNG([0.05, 0.9])
    b = ExampleBuilder(128, "electra", rng)
    long = line(1000, 130)
    a, bb = b.add_line(long)
    assert len(a) == 126 and bb == []
    ids, mask, seg = layout(a, bb, 101, 102, 128)
    assert len(ids) == 128 and sum(mask) == 128 and ids[-1] == 102 and set(seg) == {0}


def test_layout_two_segments_and_padding():
    ids, mask, seg = layout([5, 6], [7], 101, 102, 8, pad_id=0)
    assert ids == [101, 5, 6, 102, 7, 102, 0, 0]
    assert mask == [1, 1, 1, 1, 1, 1, 0, 0]
    assert seg == [0, 0, 0, 0, 1, 1, 0, 0]


def test_seeded_builder_is_deterministic_and_bad_rule_rejected():
    lines = [line(10 * i, (i * 7) % 23 + 1) for i in range(200)]
    runs = []
    for _ in range(2):
        b = ExampleBuilder(32, "electra", random.Random(1234))
        runs.append(feed(b, lines))
    assert runs[0] == runs[1] and len(runs[0]) > 10
    with pytest.raises(ConvBertError, match="segment-rule"):
        ExampleBuilder(16, "bert", random.Random(0))


@pytest.mark.parametrize("rule", ["electra", "convbert-release"])
def test_feed_fast_path_equals_add_line(rule):
    rng = random.Random(5)
    items, encoded = [], []
    for _ in range(3000):
        r = rng.random()
        if r < 0.1:
            items.append(None)
        elif r < 0.2:
            items.append("")
        else:
            items.append("x")
            encoded.append(line(rng.randrange(1000), rng.choice([0, 1, 3, 8, 20, 40, 70, 130])))
    slow = ExampleBuilder(64, rule, random.Random(9))
    want = []
    it = iter(encoded)
    for s in items:
        ex = slow.end_document() if s is None else slow.add_line(next(it)) if s else slow.add_line([], blank=True)
        if ex is not None:
            want.append(ex)
    fast = ExampleBuilder(64, rule, random.Random(9))
    got = []
    for k in range(0, len(items), 700):  # in batches, as the builder does
        chunk = items[k : k + 700]
        n_before = sum(1 for s in items[:k] if s)
        fast.feed(chunk, iter(encoded[n_before : n_before + sum(1 for s in chunk if s)]),
                  lambda a, b: got.append((a, b)))
    assert got == want and len(want) > 100
    assert fast.pending == slow.pending and fast.target_length == slow.target_length
