"""The MQAR data generator (training/mqar.py): layout, answers, noise, reproducibility, token shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import preset
from model.retnet import RetNet
from training import mqar
from training.data import load_tokens


def test_example_layout_and_answers():
    spec = mqar.MQARSpec(num_keys=20, num_values=10, num_noise=5, num_pairs=6)
    ex = mqar.make_example(spec, np.random.default_rng(0))
    assert len(ex.pairs) == 6 and len(ex.context) == 1 + 12 and ex.context[0] == mqar.BOS
    keys = [k for k, _ in ex.pairs]
    assert len(set(keys)) == 6 and all(spec.is_key(k) for k in keys)
    assert all(spec.is_value(v) for _, v in ex.pairs)
    assert ex.context[1:] == [t for p in ex.pairs for t in p]
    assert ex.queries[0] == mqar.SEP and len(ex.queries) == 1 + 2 * 6
    stored = dict(ex.pairs)
    for i in ex.answer_positions:  # every query is a stored key, followed by its value
        assert ex.queries[i + 1] == stored[ex.queries[i]]
    assert sorted(ex.queries[i] for i in ex.answer_positions) == sorted(keys)
    assert ex.tokens == ex.context + ex.queries + [mqar.EOS]
    assert max(ex.tokens) < spec.vocab_size == 3 + 20 + 10 + 5


def test_noise_between_pairs():
    spec = mqar.MQARSpec(num_keys=32, num_values=32, num_noise=8, num_pairs=8)
    for ex in mqar.make_examples(spec, 20, seed=3, noise_ratio=0.5):
        assert sum(ex.is_noise) == mqar.noise_count(16, 0.5) == 16
        assert len(ex.is_noise) == len(ex.context) == 1 + 16 + 16
        clean = [t for t, z in zip(ex.context, ex.is_noise, strict=True) if not z]
        assert clean == [mqar.BOS] + [t for p in ex.pairs for t in p]  # pairs stay adjacent and in order
        assert all(t >= spec.first_noise for t, z in zip(ex.context, ex.is_noise, strict=True) if z)


def test_seeded_reproducibility():
    spec = mqar.MQARSpec(num_pairs=8, num_queries=5)
    a = mqar.make_examples(spec, 5, seed=11, noise_ratio=0.25)
    b = mqar.make_examples(spec, 5, seed=11, noise_ratio=0.25)
    c = mqar.make_examples(spec, 5, seed=12, noise_ratio=0.25)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert [e.tokens for e in a] != [e.tokens for e in c]
    assert all(len(e.answer_positions) == 5 for e in a)
    (s1, m1), (s2, m2) = mqar.training_stream(spec, 30, seed=1), mqar.training_stream(spec, 30, seed=1)
    assert np.array_equal(s1, s2) and np.array_equal(m1, m2) and (s1 == mqar.EOS).sum() == 30
    # the loss mask marks exactly the answers: the token after each query key (after SEP)
    assert m1.shape == s1.shape and 30 <= m1.sum() <= 30 * 5  # min(5, pairs) answers per example
    assert all(spec.is_value(int(t)) and spec.is_key(int(s1[i - 1])) for i, t in enumerate(s1) if m1[i])


def test_bad_specs_are_refused():
    with pytest.raises(mqar.MQARError, match="num_pairs"):
        mqar.MQARSpec(num_keys=4, num_pairs=5)
    with pytest.raises(mqar.MQARError, match="num_queries"):
        mqar.MQARSpec(num_pairs=4, num_queries=5)
    with pytest.raises(mqar.MQARError, match="noise_ratio"):
        mqar.noise_count(4, 1.0)
    with pytest.raises(mqar.MQARError, match="num_noise"):
        mqar.make_example(mqar.MQARSpec(num_noise=0), np.random.default_rng(0), noise_ratio=0.5)


def test_token_dir_is_what_the_training_loop_reads(tmp_path):
    spec = mqar.MQARSpec(num_keys=16, num_values=16, num_noise=4, num_pairs=4)
    meta = mqar.write_token_dir(tmp_path, spec, train_examples=50, val_examples=10, seed=5)
    assert meta["vocab_size"] == spec.vocab_size
    train = load_tokens(tmp_path, "train")
    assert train.dtype == np.uint16 and int(train.max()) < spec.vocab_size
    assert int((np.asarray(train) == mqar.EOS).sum()) == 50
    assert json.loads((tmp_path / "tokens.json").read_text())["mqar"]["num_pairs"] == 4
    mask = np.fromfile(tmp_path / "train.mask.bin", dtype=np.uint8)
    assert mask.shape == train.shape and 50 <= mask.sum() <= 50 * 4
    again = tmp_path / "again"
    mqar.write_token_dir(again, spec, train_examples=50, val_examples=10, seed=5)
    assert (again / "train.bin").read_bytes() == (tmp_path / "train.bin").read_bytes()


def test_recall_accuracy_scores_answers():
    """An untrained model recalls about chance; the scorer compares argmax after each key with its value."""
    spec = mqar.MQARSpec(num_keys=16, num_values=16, num_noise=0, num_pairs=4)
    torch.manual_seed(0)
    model = RetNet(preset("tiny", vocab_size=spec.vocab_size)).eval()
    ex = mqar.make_examples(spec, 16, seed=0)
    acc = mqar.recall_accuracy(model, ex, batch_size=8)
    assert 0.0 <= acc < 0.5
    hits = mqar.answer_hits(model, mqar.read_contexts(model, ex), ex)
    assert hits.shape == (16, 4) and hits.dtype == torch.bool


def test_fused_layout_writes_one_token_per_pair():
    spec = mqar.MQARSpec(num_keys=8, num_values=4, num_noise=2, num_pairs=3, layout="fused")
    assert spec.vocab_size == 3 + 8 + 4 + 2 + 32
    ex = mqar.make_example(spec, np.random.default_rng(1), noise_ratio=0.5)
    assert sum(ex.is_noise) == 3 and len(ex.context) == 1 + 3 + 3
    pair_ids = [t for t, z in zip(ex.context[1:], ex.is_noise[1:], strict=True) if not z]
    for (k, v), t in zip(ex.pairs, pair_ids, strict=True):
        assert t == spec.first_pair + (k - spec.first_key) * 4 + (v - spec.first_value) < spec.vocab_size
    stored = dict(ex.pairs)
    assert all(ex.queries[i + 1] == stored[ex.queries[i]] for i in ex.answer_positions)
    with pytest.raises(mqar.MQARError, match="layout"):
        mqar.MQARSpec(layout="sideways")


def test_the_training_loop_trains_on_answers_only(tmp_path):
    """training/train.py reads <split>.mask.bin: masked targets become cross_entropy's ignore_index."""
    from training.config import TrainConfig
    from training.train import get_batch, load_loss_mask

    spec = mqar.MQARSpec(num_keys=16, num_values=16, num_noise=4, num_pairs=4)
    mqar.write_token_dir(tmp_path, spec, train_examples=100, val_examples=10, seed=2)
    tokens = load_tokens(tmp_path, "train")
    mask = load_loss_mask(tmp_path, "train", len(tokens))
    cfg = TrainConfig(seq_len=32, batch_size=4)
    x, y = get_batch(tokens, cfg, 0, 0, 0, torch.device("cpu"), mask)
    assert x.shape == y.shape == (4, 32) and (x >= 0).all()
    kept = y[y != -100]
    assert len(kept) > 0 and all(spec.is_value(int(t)) for t in kept)
    with pytest.raises(ValueError, match="entries"):
        load_loss_mask(tmp_path, "train", len(tokens) + 1)
