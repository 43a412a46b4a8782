"""Featurisation (§5.4) and the recipe details of the trainer (§5.1–§5.3) on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convbert.data.tokenize import WordPieceTokenizer
from convbert.finetune.features import build_ids, featurize, truncate_pair
from convbert.finetune.trainer import FinetuneConfig, build_optimizer, loss_fn, train, train_steps_for
from test_finetune_data import write_vocab


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return WordPieceTokenizer.from_vocab(write_vocab(tmp_path_factory.mktemp("v") / "vocab.txt"))


def test_truncate_longer_side_first_b_on_ties():
    a, b = list(range(5)), [10, 11, 12]
    assert truncate_pair(a, b, 6) == ([0, 1, 2], [10, 11, 12])
    a, b = [0, 1, 2, 3], [10, 11, 12, 13]
    # tie → pop b, then a is longer → pop a
    assert truncate_pair(a, b, 6) == ([0, 1, 2], [10, 11, 12])
    assert truncate_pair(a, b, 7) == ([0, 1, 2, 3], [10, 11, 12])
    assert truncate_pair([1], [2], 5) == ([1], [2])


def test_build_ids_pairs_and_singles():
    ids, types = build_ids([5, 6, 7], [8, 9], cls_id=2, sep_id=3, max_seq_length=8)
    assert ids == [2, 5, 6, 7, 3, 8, 9, 3] and types == [0, 0, 0, 0, 0, 1, 1, 1]
    ids, types = build_ids([5, 6, 7, 8, 9], [10, 11], cls_id=2, sep_id=3, max_seq_length=7)
    assert ids == [2, 5, 6, 3, 10, 11, 3]  # a cut from 5 to 2 (the longer side) → total 4 = 7 − 3
    ids, types = build_ids(list(range(10, 20)), None, cls_id=2, sep_id=3, max_seq_length=6)
    assert ids == [2, 10, 11, 12, 13, 3] and types == [0] * 6
    # an empty second text is a single segment with the single-text budget (the original's `if tokens_b:`)
    ids, types = build_ids(list(range(10, 20)), [], cls_id=2, sep_id=3, max_seq_length=6)
    assert ids == [2, 10, 11, 12, 13, 3] and types == [0] * 6


def test_featurize_fixed_padding_and_labels(tok):
    f = featurize(["the cat sat", "a dog"], ["on the mat", "hello"], ["1", "0"], tok, 12, ["0", "1"])
    assert f.input_ids.shape == (2, 12)
    v = tok.vocab
    row = [v["[CLS]"], v["the"], v["cat"], v["sat"], v["[SEP]"], v["on"], v["the"], v["mat"], v["[SEP]"]]
    assert f.input_ids[0, :9].tolist() == row and f.input_ids[0, 9:].tolist() == [tok.pad_id] * 3
    assert f.attention_mask[0].tolist() == [1] * 9 + [0] * 3
    assert f.token_type_ids[0].tolist() == [0] * 5 + [1] * 4 + [0] * 3
    assert f.labels.tolist() == [1, 0]
    b = f.batch([1, 0])
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (2, 12)
    assert f.batch([1], pad_to_max=False)["input_ids"].shape == (1, 6)  # [CLS] a dog [SEP] hello [SEP]
    r = featurize(["the cat"], ["a dog"], [3.5], tok, 8, None)
    assert r.labels.dtype == np.float32 and r.labels.tolist() == [pytest.approx(0.7)]  # STS-B: label / 5
    t = featurize(["the cat"], None, [None], tok, 8, ["contradiction", "entailment", "neutral"])
    assert t.labels.tolist() == [0]  # test rows get the first label as a dummy, like the original


def test_loss_is_summed_over_the_batch():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert loss_fn(logits, y, False, "sum").item() == pytest.approx(per.sum().item())
    assert loss_fn(logits, y, False, "mean").item() == pytest.approx(per.mean().item())
    r = loss_fn(torch.tensor([[0.5], [0.1]]), torch.tensor([0.7, 0.1]), True, "sum")
    assert r.item() == pytest.approx(0.04)


def _tiny_classifier(n_vocab, num_labels=2):
    from convbert.model.config import ConvBertConfig
    from convbert.model.heads import ConvBertForSequenceClassification

    torch.manual_seed(0)
    return ConvBertForSequenceClassification(ConvBertConfig.from_preset("tiny", vocab_size=n_vocab), num_labels)


def test_optimizer_groups_use_original_multipliers(tok):
    model = _tiny_classifier(tok.vocab_size)
    opt = build_optimizer(model, FinetuneConfig(), 3e-4)
    scale = {}
    decay = {}
    for g in opt.param_groups:
        for n in g["param_names"]:
            scale[n], decay[n] = g["lr_scale"], g["weight_decay"]
    L = 2
    assert scale["convbert.embeddings.word_embeddings.weight"] == pytest.approx(0.8 ** (L + 2))
    assert scale["convbert.embeddings_project.weight"] == pytest.approx(0.8 ** (L + 2))
    assert scale["convbert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(0.8 ** 3)
    assert scale["convbert.encoder.layer.1.output.dense.weight"] == pytest.approx(0.8 ** 2)  # top layer 0.8²
    assert scale["classifier.out_proj.weight"] == 1.0
    assert decay["convbert.embeddings.word_embeddings.weight"] == 0.01  # embeddings are decayed
    assert decay["convbert.encoder.layer.0.output.LayerNorm.weight"] == 0.0
    assert decay["classifier.out_proj.bias"] == 0.0
    off = build_optimizer(model, FinetuneConfig(layer_decay=1.0), 3e-4)
    assert {g["lr_scale"] for g in off.param_groups} == {1.0}


def test_train_steps_and_warmup(tok):
    assert train_steps_for(5, 2, 3) == 9  # ceil(5/2) × 3: the original pads to a multiple of the batch
    model = _tiny_classifier(tok.vocab_size)
    f = featurize(["the cat sat"] * 5, None, ["1", "0", "1", "0", "1"], tok, 8, ["0", "1"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train(model, f, FinetuneConfig(batch_size=2), False, epochs=2, seed=1, peak_lr=1e-3)
    assert stats.steps == 6 and stats.warmup_steps == pytest.approx(0.6) and stats.n_train == 5
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    stats = train(model, f, FinetuneConfig(batch_size=2), False, epochs=10, seed=1, peak_lr=1e-3)
    assert stats.steps == 30 and stats.warmup_steps == pytest.approx(3.0)


def test_lr_zero_at_step_zero(tok):
    model = _tiny_classifier(tok.vocab_size)
    f = featurize(["the cat sat"] * 4, None, ["1", "0", "1", "0"], tok, 8, ["0", "1"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def stop_after_first(step, loss):
        seen.append(step)
        if step == 1:
            snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
            assert all(torch.equal(before[n], snapshot[n]) for n in before)
            raise StopIteration

    with pytest.raises(StopIteration):
        train(model, f, FinetuneConfig(batch_size=2), False, epochs=10, seed=1, peak_lr=1e-3,
              on_step=stop_after_first)
    assert seen == [1]


def test_train_with_one_seed_is_one_run_whatever_ran_before(tok):
    """`train`'s seed fixes the dropout masks too: two copies of one model give the same run even when torch's
    global RNG was left in different states (dropout had drawn from it unseeded)."""
    import copy

    model = _tiny_classifier(tok.vocab_size)
    f = featurize(["the cat sat", "a dog ran", "the sun"] * 4, None, ["1", "0", "1"] * 4, tok, 8, ["0", "1"])
    runs = []
    for disturbance in (1, 2):
        torch.manual_seed(disturbance)
        twin = copy.deepcopy(model)
        stats = train(twin, f, FinetuneConfig(batch_size=4), False, epochs=2, seed=1, peak_lr=1e-3)
        runs.append((stats.loss_history, [p.detach().clone() for p in twin.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    other = copy.deepcopy(model)
    assert train(other, f, FinetuneConfig(batch_size=4), False, epochs=2, seed=2, peak_lr=1e-3).loss_history \
        != runs[0][0]


def test_a_pair_truncated_to_nothing_at_length_4_gets_no_second_sep():
    """The original tests `if tokens_b:` after truncating: at max_seq_length 4 the pair's one token goes to A."""
    ids, types = build_ids([5, 6], [8], cls_id=2, sep_id=3, max_seq_length=4)
    assert ids == [2, 5, 3] and types == [0, 0, 0]
    ids, types = build_ids([5], [8, 9], cls_id=2, sep_id=3, max_seq_length=4)
    assert ids == [2, 5, 3] and types == [0, 0, 0]  # (b pops on ties)
    ids, types = build_ids([5], [8, 9, 10], cls_id=2, sep_id=3, max_seq_length=5)
    assert ids == [2, 5, 3, 8, 3] and types == [0, 0, 0, 1, 1]


def test_featurize_refuses_mismatched_lengths_and_unknown_or_non_finite_labels(tok):
    from convbert.errors import ConvBertError

    with pytest.raises(ConvBertError, match=r"2 labels for 4 texts_a"):
        featurize(["a", "b", "c", "d"], None, ["0", "1"], tok, 8, ["0", "1"])
    with pytest.raises(ConvBertError, match=r"1 texts_b for 4 texts_a"):
        featurize(["a", "b", "c", "d"], ["x"], ["0"] * 4, tok, 8, ["0", "1"])
    with pytest.raises(ConvBertError, match="sequences of texts, not one string"):
        featurize("the cat", None, ["0"] * 7, tok, 8, ["0", "1"])
    with pytest.raises(ConvBertError, match=r"label 1 of example 0 is not in label_list \['0', '1'\].*1 is not '1'"):
        featurize(["a", "b"], None, [1, 0], tok, 8, ["0", "1"])
    with pytest.raises(ConvBertError, match=r"label 'dgo' of example 1"):
        featurize(["a", "b"], None, ["cat", "dgo"], tok, 8, ["cat", "dog"])
    with pytest.raises(ConvBertError, match=r"label 'shuffled' of example 0 is not a number"):
        featurize(["a"], None, ["shuffled"], tok, 8, None)
    with pytest.raises(ConvBertError, match=r"label nan of example 1: expected a finite regression target"):
        featurize(["a", "b"], None, [0.6, float("nan")], tok, 8, None)


def test_train_checks_its_config_and_the_head_against_the_task(tok):
    from convbert.errors import ConvBertError

    model = _tiny_classifier(len(tok.vocab))
    f = featurize(["the cat", "a dog"], None, ["1", "0"], tok, 8, ["0", "1"])
    with pytest.raises(ConvBertError, match="loss reduction must be sum or mean, got Sum"):
        train(model, f, FinetuneConfig(loss_reduction="Sum"), False, epochs=1, seed=1, peak_lr=1e-3)
    with pytest.raises(ConvBertError, match=r"--layer-decay must be in \(0, 1\]"):
        train(model, f, FinetuneConfig(layer_decay=0.0), False, epochs=1, seed=1, peak_lr=1e-3)
    with pytest.raises(ConvBertError, match=r"regression=True but the model's head has 2 output\(s\)"):
        train(model, featurize(["a"], None, [0.5], tok, 8, None), FinetuneConfig(), True, epochs=1, seed=1,
              peak_lr=1e-3)
    with pytest.raises(ConvBertError, match=r"regression=False but the model's head has 1 output\(s\)"):
        train(_tiny_classifier(len(tok.vocab), 1), f, FinetuneConfig(), False, epochs=1, seed=1, peak_lr=1e-3)


def test_num_labels_may_be_a_numpy_integer(tok):
    model = _tiny_classifier(len(tok.vocab), np.int64(3))
    assert model.num_labels == 3 and type(model.num_labels) is int
