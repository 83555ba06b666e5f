"""Thresholds as PaddleX 3.x takes them: a float, a list of C floats, or a dict with a default."""

import numpy as np
import pytest

from mlcls_ray.infer.thresholds import ThresholdError, parse, resolve

NAMES = ["cat", "dog", "car"]
FOLDER = [0.3, 0.6, 0.7]


@pytest.mark.parametrize(("given", "expected"), [
    (None, FOLDER), ("None", FOLDER), ("0.4", [0.4] * 3), (0.25, [0.25] * 3), ("[0.1, 0.2, 0.3]", [0.1, 0.2, 0.3]),
    ("{default: 0.5, 2: 0.9}", [0.5, 0.5, 0.9]), ({"default": "0.5", "1": "0.1"}, [0.5, 0.1, 0.5]),
    ('{"default": 0.5, "dog": 0.2}', [0.5, 0.2, 0.5])])
def test_every_shape_resolves_per_class(given, expected):
    np.testing.assert_allclose(resolve(parse(given), NAMES, FOLDER), expected, rtol=1e-6)


@pytest.mark.parametrize(("given", "message"), [
    ("{1: 0.4}", "needs a 'default' key"), ("1.5", "not a number in [0, 1]"), ("[0.1, x]", "'x' is not a number"),
    ("nan", "not a number in [0, 1]"), ("[]", "an empty list"), ("{default: [1]}", "not a number"),
    ("{default: 0.5", "does not parse"), (True, "use a number in")])
def test_bad_shapes_are_refused_with_a_reason(given, message):
    with pytest.raises(ThresholdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(given)


@pytest.mark.parametrize(("given", "message"), [
    ([0.5, 0.5], "a list of 2 numbers, but the model has 3 classes"), ({"default": 0.5, 3: 0.1}, "ids are 0..2"),
    ({"default": 0.5, "bird": 0.1}, "'bird' is not a class")])
def test_a_threshold_that_does_not_fit_the_model(given, message):
    with pytest.raises(ThresholdError, match=message):
        resolve(given, NAMES, FOLDER)
