"""A short training run of ``induction-2l`` from its shipped seed goes through the induction phase change quickly.

Marked slow: it trains for real (about a minute on one CPU thread).
"""

import time

import pytest
import torch

from attnscope.zoo import induction_2l

STEPS = 900


@pytest.mark.slow
def test_induction_2l_reaches_the_phase_change_from_its_seed_in_under_two_minutes():
    start = time.perf_counter()
    model, log = induction_2l.fit(seed=induction_2l.SEED, steps=STEPS, eval_every=50)
    elapsed = time.perf_counter() - start
    curve = log["repeat_curve"]  # [step, held-out repeat loss, repeat accuracy]
    first_loss, last_loss, last_acc = curve[0][1], curve[-1][1], curve[-1][2]
    assert first_loss > 4.0  # ~ln(vocab): nothing predictable at the start
    assert last_loss < 0.5 * first_loss and last_acc > 0.8
    # a phase change, not a slow slide: most of the drop happens within a few hundred steps
    drops = [a[1] - b[1] for a, b in zip(curve, curve[4:])]
    assert max(drops) > 0.5 * (first_loss - last_loss)
    assert log["phase_change_step"] is not None and log["phase_change_step"] < STEPS
    assert elapsed < 120, f"took {elapsed:.0f} s"
    # it is induction: the repeat accuracy is not a positional shortcut (fresh periods, fresh seed)
    suite = induction_2l.make_suite(64, seed=4242)
    ids, target = induction_2l.tensors(suite)
    acc, _ = induction_2l.repeat_metrics(model, ids, target)
    assert acc > 0.8
    scores = induction_2l.head_scores(model, suite)
    assert float(scores["induction"][1].max()) > 0.5
    assert torch.get_num_threads() >= 1
