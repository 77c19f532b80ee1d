"""Gradient accumulation to an effective batch above 1,000 sequences equals one pass over that batch."""

from __future__ import annotations

import torch
from memory_checks import accumulation_reference, accumulation_run

STEPS = 2
BATCH_PER_RANK, MICROBATCHES, ACCUMULATE = 64, 4, 8  # x 2 data-parallel ranks = 1,024 sequences per step


def test_accumulated_gradients_equal_the_one_shot_gradient(pool2) -> None:
    """dp=2 x 8 accumulated Lightning batches x 4 micro-batches of 16 sequences = 1,024 per optimizer step.

    Each step's reduced gradient equals the gradient of one pass over the same 1,024 sequences, for
    the first step and for the second (after an SGD update and a router-bias update from loads that
    were summed over every micro-batch of both ranks).
    """
    effective = BATCH_PER_RANK * pool2.world_size * ACCUMULATE
    assert effective > 1000
    results = pool2.run(accumulation_run, STEPS, BATCH_PER_RANK, MICROBATCHES, ACCUMULATE)
    expected = accumulation_reference(STEPS, effective)
    for grads in results:
        assert len(grads) == STEPS
        for step in range(STEPS):
            for name, g in expected[step].items():
                err = float((grads[step][name] - g).norm() / g.norm().clamp_min(1e-12))
                assert err < 1e-5, (step, name, err)
    torch.testing.assert_close(results[0][1]["embed.weight"], results[1][1]["embed.weight"])
