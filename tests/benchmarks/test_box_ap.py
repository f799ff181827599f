"""The benchmark's box-matching AP against hand-computed cases."""

import numpy as np
import pytest

from benchmarks.beyond.box_ap import average_precision_from_matches, box_iou, mean_average_precision

A = [0, 0, 2, 2]
B = [10, 10, 12, 12]


def dets(*items):
    """(boxes, scores, labels) of one image from (box, score, label) triples."""
    if not items:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    boxes, scores, labels = zip(*items)
    return np.array(boxes, float), np.array(scores), np.array(labels)


def gts(*items):
    boxes, labels = zip(*items)
    return np.array(boxes, float), np.array(labels)


def test_iou_by_hand():
    # [0,0,2,2] vs [1,0,3,2]: intersection 1x2 = 2, union 4 + 4 - 2 = 6.
    assert box_iou([A], [[1, 0, 3, 2]])[0, 0] == pytest.approx(1 / 3)
    assert box_iou([A], [B])[0, 0] == 0.0
    assert box_iou([A], [A])[0, 0] == 1.0


def test_perfect_detection_is_one():
    assert mean_average_precision([dets((A, 0.9, 0))], [gts((A, 0))])["map"] == 1.0


def test_a_false_positive_ranked_between_two_hits():
    # Ranked TP, FP, TP over 2 objects: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Monotone envelope 1, 2/3, 2/3; AP = 1/2 * 1 + 0 + 1/2 * 2/3 = 5/6.
    d = dets((A, 0.9, 0), ([20, 20, 22, 22], 0.8, 0), (B, 0.7, 0))
    assert mean_average_precision([d], [gts((A, 0), (B, 0))])["map"] == pytest.approx(5 / 6)
    assert average_precision_from_matches(np.array([1, 0, 1]), 2) == pytest.approx(5 / 6)


def test_a_duplicate_is_a_false_positive():
    # Both detections cover A; the second finds A taken, so recall stops at 1/2: AP = 1/2.
    d = dets((A, 0.9, 0), ([0, 0, 2, 2.2], 0.8, 0))
    assert mean_average_precision([d], [gts((A, 0), (B, 0))])["map"] == pytest.approx(0.5)


def test_iou_below_the_threshold_misses():
    d = dets(([1, 0, 3, 2], 0.9, 0))  # IoU 1/3 with A
    assert mean_average_precision([d], [gts((A, 0))], iou_threshold=0.5)["map"] == 0.0
    assert mean_average_precision([d], [gts((A, 0))], iou_threshold=0.3)["map"] == 1.0


def test_classes_are_matched_separately_and_averaged_over_classes_with_objects():
    # Image 1: class 0 found. Image 2: class 1 object; a class-2 detection on it (class 2 has no
    # objects, so it is not averaged) and a lower-scored correct one after a class-1 false positive.
    images = [dets((A, 0.9, 0)), dets((B, 0.95, 2), ([30, 30, 32, 32], 0.9, 1), (B, 0.5, 1))]
    truth = [gts((A, 0)), gts((B, 1))]
    result = mean_average_precision(images, truth)
    assert result["per_class"] == {0: 1.0, 1: pytest.approx(0.5)}  # class 1: FP then TP, AP = 1 * 1/2
    assert result["map"] == pytest.approx(0.75)


def test_matching_is_per_image_and_takes_the_best_unmatched_box():
    # One detection overlaps two objects; it takes the better one (IoU 1), the second detection the other.
    d = dets(([0, 0, 2, 2], 0.9, 0), ([1, 0, 3, 2], 0.8, 0))
    assert mean_average_precision([d], [gts(([1, 0, 3, 2], 0), (A, 0))])["map"] == 1.0
    # A detection in image 2 cannot match an object of image 1.
    assert mean_average_precision([dets(), dets((A, 0.9, 0))], [gts((A, 0)), gts((B, 0))])["map"] == 0.0
