"""Fitting a decision threshold on labelled examples, for yes/no judgements read from log-probabilities.

A small model leans towards one answer whatever it is asked; the log-odds of its answers still rank cases
well. So instead of taking the answer with the higher probability, a stage fits the cut-off on cases whose
answer is known, by balanced accuracy (the mean of the true-positive and true-negative rates).
"""

from __future__ import annotations

import numpy as np


def best_threshold(margins: np.ndarray, labels: np.ndarray) -> tuple[float, float] | None:
    """The cut `c` for which `margin > c` best predicts `labels`, and its balanced accuracy; ties go to the
    lowest cut. None when the labels hold only one class. An accuracy near 0.5 means the model's answers
    carry no information about the question on these cases."""
    margins, labels = np.asarray(margins, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    order = np.unique(margins)
    cuts = np.concatenate([[order[0] - 1.0], (order[1:] + order[:-1]) / 2, [order[-1] + 1.0]])
    predicted = margins[None, :] > cuts[:, None]
    balanced = (predicted & labels).sum(axis=1) / n_pos + (~predicted & ~labels).sum(axis=1) / n_neg
    best = int(np.argmax(balanced))
    return float(cuts[best]), float(balanced[best]) / 2
