"""telechat_ascend.sampling against transformers' logits processors."""

import numpy as np
import pytest
import torch

from telechat_ascend.sampling import process_logits


@pytest.mark.parametrize("seed", range(12))
def test_process_logits_matches_transformers_processors(seed):
    """The shared score processing (MindSpore generation, the serving engine) against transformers' own processors (repetition penalty, then
    temperature, top-k and top-p), on random logits, histories and settings."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    rows = rng.integers(0, 50, (3, 7))
    temperature, top_k = float(rng.uniform(0.3, 2.0)), int(rng.choice([0, 1, 5, 20]))
    top_p, penalty = float(rng.choice([1.0, 0.9, 0.5, 0.1])), float(rng.choice([1.0, 1.3, 0.7]))
    scores, ids = torch.from_numpy(logits.copy()), torch.from_numpy(rows)
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    for processor in ((TemperatureLogitsWarper(temperature),) + ((TopKLogitsWarper(top_k),) if top_k else ())
                      + ((TopPLogitsWarper(top_p),) if top_p < 1.0 else ())):
        scores = processor(ids, scores)
    expected = scores.numpy()
    got = process_logits(logits, rows, True, temperature, top_k, top_p, penalty)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)
