"""The one evaluation loop: each datapoint encoded once per group of draws, memory bounded by
splitting datapoints and (only when needed) draws, the same numbers however it is split."""

from __future__ import annotations

import torch

from vaelab import BatchPipeline, DataSpec, ModelConfig, build_model
from vaelab.conditioning import build_condition
from vaelab.evaluation import evaluate_batches


def _model_and_data(n: int = 12):
    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=3, hidden=(16,)), DataSpec((1, 6, 6)))
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8)
    return model, images, BatchPipeline(build_condition("none", model.spec))


def _count_encoder_rows(model) -> list[int]:
    rows: list[int] = []
    model.encoder.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    return rows


def test_each_datapoint_is_encoded_once_when_its_draws_fit():
    model, images, pipe = _model_and_data()
    rows = _count_encoder_rows(model)
    ev = evaluate_batches(model, images, None, pipe, k=40, batch_size=5)
    assert rows[1:] == [5, 5, 2]  # after the one-row probe that sizes the calls: one pass per batch
    assert ev.n == 12 and ev.lk.shape == (12,) and ev.layers[0].mean.shape == (12, 3)


def test_a_small_budget_splits_datapoints_then_draws_with_the_same_results():
    model, images, pipe = _model_and_data()
    full = evaluate_batches(model, images, None, pipe, k=40, batch_size=12, seed=1)
    per_row = 36  # a Bernoulli over 6x6 pixels: 36 logits per datapoint and draw
    rows = _count_encoder_rows(model)
    small = evaluate_batches(model, images, None, pipe, k=40, batch_size=12, seed=1, budget=10 * per_row)
    assert rows[1:] == [1] * 4 * 12  # 10 draws per call: 4 passes for each datapoint, one at a time
    # the KL (closed form) and the posterior means do not depend on the draws; L_k does, within its noise
    torch.testing.assert_close(small.layers[0].kl, full.layers[0].kl)
    torch.testing.assert_close(small.layers[0].mean, full.layers[0].mean)
    assert (small.lk - full.lk).abs().max() < 1.0
    assert small.elbo.mean() < small.lk.mean()


def test_validation_is_the_loop_with_one_draw():
    model, images, pipe = _model_and_data()
    ev = evaluate_batches(model, images, None, pipe, k=1, batch_size=5)
    m = ev.means()
    assert abs(m["elbo"] - (m["rec"] - m["kl"])) < 1e-9
    empty = evaluate_batches(model, images[:0], None, pipe, k=1).means()
    assert all(v != v for v in empty.values())  # NaN without data
