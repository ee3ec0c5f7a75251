import numpy as np

from tasks.calibration import best_threshold


def test_separable_margins_give_the_midpoint_and_full_accuracy():
    assert best_threshold(np.array([3.0, 2.5, 1.0, 0.5]), np.array([True, True, False, False])) == (1.75, 1.0)


def test_overlap_gives_the_best_balanced_cut():
    margins = np.array([3.0, 1.0, 2.0, 0.0, -1.0])
    labels = np.array([True, True, False, False, False])
    cut, accuracy = best_threshold(margins, labels)
    # cut 0.5: both positives above, one negative above -> (2/2 + 2/3) / 2
    assert cut == 0.5 and accuracy == (1 + 2 / 3) / 2


def test_uninformative_and_one_class():
    # One margin for all: every cut predicts one class for all, balanced accuracy (1 + 0) / 2. Plain accuracy
    # would prefer the cut above (3 of 4 right); ties go to the lowest cut, 1 - 1.
    assert best_threshold(np.array([1.0, 1.0, 1.0, 1.0]), np.array([True, False, False, False])) == (0.0, 0.5)
    assert best_threshold(np.array([1.0, 2.0]), np.array([True, True])) is None
