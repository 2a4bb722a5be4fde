"""ACC and FM on hand-computed matrices, and schedule parsing."""

import math

import numpy as np
import pytest

from defectlens.metrics.incremental import average_accuracy, first_steps, forgetting_measure

NAN = float("nan")


def test_acc_and_fm_on_a_hand_computed_10_1x2_style_matrix():
    # 2 objects in step 0, one more in each of steps 1 and 2.
    accuracy = [[0.90, 0.80, NAN, NAN],
                [0.85, 0.82, 0.70, NAN],
                [0.80, 0.78, 0.75, 0.60]]
    # ACC = (0.80 + 0.78 + 0.75 + 0.60) / 4
    assert average_accuracy(accuracy) == pytest.approx(2.93 / 4)
    # FM over objects 0..2: drops 0.90-0.80, 0.82-0.78, 0.70-0.75 (object 3 is new in the last step)
    assert forgetting_measure(accuracy) == pytest.approx((0.10 + 0.04 - 0.05) / 3)
    assert first_steps(accuracy).tolist() == [0, 0, 1, 2]


def test_a_model_that_never_forgets_has_zero_fm_and_a_perfect_one_acc_1():
    accuracy = np.full((4, 5), 1.0)
    accuracy[0, 2:] = NAN
    assert average_accuracy(accuracy) == 1.0
    assert forgetting_measure(accuracy) == 0.0


def test_single_step_has_no_forgetting_and_unlearned_objects_are_refused():
    assert math.isnan(forgetting_measure([[0.9, 0.8]]))
    with pytest.raises(ValueError, match="last step"):
        average_accuracy([[0.9, NAN]])
