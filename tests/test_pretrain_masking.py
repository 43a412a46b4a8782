"""Dynamic masking (spec §3.2) and ELECTRA's scatter semantics."""

import torch

from convbert.pretrain.masking import mask_batch, num_predictions, scatter_update

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def make_batch(lengths, T=128, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(10, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = PAD
        ids[i, 0] = CLS
        ids[i, n - 1] = SEP
    return ids, mask, torch.zeros_like(ids)


def do_mask(ids, mask, seg, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return mask_batch(ids, mask, seg, cls_id=CLS, sep_id=SEP, mask_id=MASK, generator=g, **kw)


def test_num_predictions_is_19_for_128():
    assert num_predictions(128) == 19
    assert num_predictions(512) == int(0.155 * 512)


def test_counts_per_example_round_half_even_and_clamped():
    # 0.15 * len: 10 -> 1.5 -> 2 ; 30 -> 4.5 -> 4 (half to even) ; 50 -> 7.5 -> 8 ; 128 -> 19.2 -> 19 ; 3 -> 0.45 -> 1
    lengths = [10, 30, 50, 128, 3, 100]
    ids, mask, seg = make_batch(lengths)
    mb = do_mask(ids, mask, seg)
    expected = [2, 4, 8, 19, 1, 15]
    assert mb.positions.shape == (6, 19)
    assert mb.weights.sum(1).tolist() == expected
    # used slots come first; unused slots point at position 0 with weight 0 and target id 0
    for i, k in enumerate(expected):
        assert mb.weights[i, :k].eq(1).all() and mb.weights[i, k:].eq(0).all()
        assert mb.positions[i, k:].eq(0).all() and mb.target_ids[i, k:].eq(0).all()


def test_positions_are_candidates_and_targets_are_original_ids():
    ids, mask, seg = make_batch([128, 64, 20] * 20)
    ids[:, 5] = MASK  # an existing [MASK] token is not a candidate
    mb = do_mask(ids, mask, seg)
    used = mb.weights.bool()
    pos = mb.positions[used]
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(mb.positions)[used]
    assert (pos > 0).all()
    assert mask[rows, pos].eq(1).all()
    tok = ids[rows, pos]
    assert not torch.isin(tok, torch.tensor([CLS, SEP, MASK, PAD])).any()
    assert torch.equal(mb.target_ids[used], tok)
    assert torch.equal(mb.original_ids, ids)


def test_mask_or_unchanged_85_15_no_random_tokens():
    ids, mask, seg = make_batch([128] * 400, seed=3)
    mb = do_mask(ids, mask, seg, seed=5)
    changed = mb.input_ids != ids
    # only [MASK] is ever written
    assert mb.input_ids[changed].eq(MASK).all()
    # only selected positions change
    selected = torch.zeros_like(ids, dtype=torch.bool)
    used = mb.weights.bool()
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(mb.positions)
    selected[rows[used], mb.positions[used]] = True
    assert not (changed & ~selected).any()
    # fraction of selected distinct positions that became [MASK]: 1 - P(all slots of a position unchanged);
    # for a position drawn once it is 0.85 — most positions are drawn once
    frac = changed.sum().item() / selected.sum().item()
    assert 0.84 < frac < 0.90, frac


def test_with_replacement_duplicates_and_uniformity():
    ids, mask, seg = make_batch([128] * 2000, seed=7)
    mb = do_mask(ids, mask, seg, seed=11)
    distinct = torch.tensor([len(set(r.tolist())) for r in mb.positions])
    # spec §3.2: ~126 candidates, 19 draws -> expected distinct ≈ 17.7, P(no duplicate) ≈ 0.24
    assert 17.4 < distinct.float().mean().item() < 18.0
    p_nodup = (distinct == 19).float().mean().item()
    assert 0.19 < p_nodup < 0.29
    all_counts = torch.bincount(mb.positions.flatten(), minlength=128)
    assert all_counts[0] == 0 and all_counts[127] == 0  # [CLS] and [SEP] are never drawn
    counts = all_counts[1:127].float()
    # uniform over the 126 candidates: chi-square statistic near its 125 degrees of freedom
    chi2 = (((counts - counts.mean()) ** 2) / counts.mean()).sum().item()
    assert 80 < chi2 < 180, chi2


def test_without_replacement_distinct_positions():
    ids, mask, seg = make_batch([128, 12, 6] * 50, seed=2)
    mb = do_mask(ids, mask, seg, with_replacement=False)
    for r, w in zip(mb.positions, mb.weights):
        used = r[w.bool()].tolist()
        assert len(used) == len(set(used))
    assert mb.weights.sum(1)[:3].tolist() == [19, 2, 1]


def test_no_candidates_gives_zero_weight():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 50, SEP, PAD]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    mb = do_mask(ids, mask, torch.zeros_like(ids), max_predictions=2)
    assert mb.weights[0].sum() == 0 and mb.positions[0].eq(0).all()
    assert mb.weights[1].tolist() == [1.0, 0.0] and mb.positions[1, 0] == 1


def test_masking_is_deterministic_given_generator_state():
    ids, mask, seg = make_batch([128, 90])
    a = do_mask(ids, mask, seg, seed=4)
    b = do_mask(ids, mask, seg, seed=4)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.input_ids, b.input_ids)


def test_scatter_update_floor_average_and_position_zero_ignored():
    seq = torch.tensor([[100, 101, 102, 103, 104]])
    updates = torch.tensor([[7, 10, 3, 50, 9]])
    positions = torch.tensor([[2, 2, 2, 0, 4]])
    out, updated = scatter_update(seq, updates, positions)
    # position 2: floor((7 + 10 + 3) / 3) = 6 ; position 0 ignored ; position 4 = 9
    assert out.tolist() == [[100, 101, 6, 103, 9]]
    assert updated.tolist() == [[0, 0, 1, 0, 1]]
    out, _ = scatter_update(seq, torch.tensor([[5, 6]]), torch.tensor([[3, 3]]))
    assert out[0, 3].item() == 5  # floor(11 / 2)
