"""Tests of `tf_mtl.metrics`: relative improvement (MPPS eq. 5) and summaries."""

import keras
import pytest

from tf_mtl import metrics
from tf_mtl.tasks import Metric, Task, classification


def test_relative_improvement_higher_is_better():
    # +20% and -10%: mean +5%.
    delta = metrics.relative_improvement(
        {"a_acc": 0.9, "b_acc": 0.45}, {"a_acc": 0.75, "b_acc": 0.5},
        {"a_acc": True, "b_acc": True},
    )

    assert delta == pytest.approx(5.0)


def test_relative_improvement_lower_is_better():
    # Error down from 0.25 to 0.2 is +20%; up from 2 to 3 is -50%.
    delta = metrics.relative_improvement(
        {"a_err": 0.2, "b_err": 3.0}, {"a_err": 0.25, "b_err": 2.0},
        {"a_err": False, "b_err": False},
    )

    assert delta == pytest.approx(-15.0)


def test_relative_improvement_mixed_directions():
    # Accuracy 0.5 -> 0.8 is +60%; error 0.2 -> 0.3 is -50%: mean +5%.
    delta = metrics.relative_improvement(
        {"a_acc": 0.8, "b_err": 0.3}, {"a_acc": 0.5, "b_err": 0.2},
        {"a_acc": True, "b_err": False},
    )

    assert delta == pytest.approx(5.0)


def test_relative_improvement_divides_by_the_magnitude_of_the_reference():
    # A negative reference (e.g. a log-likelihood) improving from -2 to -1 is
    # +50%, not -50%.
    delta = metrics.relative_improvement({"ll": -1.0}, {"ll": -2.0}, {"ll": True})

    assert delta == pytest.approx(50.0)


def test_relative_improvement_reads_only_the_named_metrics():
    delta = metrics.relative_improvement(
        {"a_acc": 0.6, "loss": 9.0, "a_loss": 3.0}, {"a_acc": 0.5, "loss": 1.0},
        {"a_acc": True},
    )

    assert delta == pytest.approx(20.0)


def test_relative_improvement_is_zero_for_equal_results():
    results = {"a_acc": 0.7, "b_err": 0.1}

    assert metrics.relative_improvement(
        results, dict(results), {"a_acc": True, "b_err": False}
    ) == 0.0


@pytest.mark.parametrize("where", ["results", "reference"])
def test_relative_improvement_names_a_missing_metric(where):
    full, partial = {"a_acc": 0.9, "b_acc": 0.8}, {"a_acc": 0.9}
    results, reference = (partial, full) if where == "results" else (full, partial)

    with pytest.raises(KeyError, match=rf"'b_acc' is missing from `{where}`"):
        metrics.relative_improvement(
            results, reference, {"a_acc": True, "b_acc": True}
        )


def test_relative_improvement_rejects_a_zero_reference():
    with pytest.raises(ValueError, match="Reference value of 'b_err' is 0"):
        metrics.relative_improvement(
            {"a_acc": 0.9, "b_err": 0.1}, {"a_acc": 0.8, "b_err": 0.0},
            {"a_acc": True, "b_err": False},
        )


def test_relative_improvement_rejects_no_metric():
    with pytest.raises(ValueError, match="names no metric"):
        metrics.relative_improvement({"a": 1.0}, {"a": 1.0}, {})


def test_accuracy_summary():
    summary = metrics.accuracy_summary([0.9, 0.5, 0.7, 0.6])

    assert summary == pytest.approx(
        {"lowest": 0.5, "median": 0.65, "average": 0.675}
    )


def test_accuracy_summary_of_an_odd_count_and_of_dict_values():
    summary = metrics.accuracy_summary({"a": 0.2, "b": 0.9, "c": 0.4}.values())

    assert summary == pytest.approx(
        {"lowest": 0.2, "median": 0.4, "average": 0.5}
    )


def test_accuracy_summary_rejects_no_accuracy():
    with pytest.raises(ValueError, match="`accuracies` is empty"):
        metrics.accuracy_summary([])


def test_directions_of_tasks():
    regression = Task(
        "depth", head=lambda: keras.layers.Dense(1), loss=None,
        metrics=(Metric("mae", keras.metrics.MeanAbsoluteError,
                        higher_is_better=False),
                 Metric("r2", keras.metrics.R2Score)),
    )
    no_metric = Task("aux", head=lambda: keras.layers.Dense(1), loss=None)

    result = metrics.directions(
        [classification("left", 10), regression, no_metric]
    )

    assert result == {"left_accuracy": True, "depth_mae": False, "depth_r2": True}


def test_directions_feed_relative_improvement():
    tasks = [classification("left", 10), classification("right", 10)]

    delta = metrics.relative_improvement(
        {"left_accuracy": 0.88, "right_accuracy": 0.8, "left_loss": 0.3},
        {"left_accuracy": 0.8, "right_accuracy": 0.8},
        metrics.directions(tasks),
    )

    assert delta == pytest.approx(5.0)


def test_safeness_on_a_hand_made_table():
    # Task a: two metrics (accuracy up, error down), task b: one.
    stl = {"a_acc": 0.80, "a_err": 2.0, "b_acc": 0.50}
    method = {"a_acc": 0.88, "a_err": 2.5, "b_acc": 0.55}
    tasks = {"a": {"a_acc": True, "a_err": False}, "b": {"b_acc": True}}
    out = metrics.safeness(method, stl, tasks)
    assert out["delta"] == pytest.approx({"a_acc": 0.08, "a_err": -0.5, "b_acc": 0.05})
    # a: (0.08/0.8 - 0.5/2) / 2 = -0.075; b: 0.05/0.5 = 0.1; mean 0.0125.
    assert out["delta_i"] == pytest.approx(1.25)
    # a: one of two metrics no worse, b: its one: (0.5 + 1) / 2.
    assert out["eta_hat"] == pytest.approx(75.0)


def test_safeness_counts_equal_as_safe_and_names_missing_metrics():
    tasks = {"a": {"a_loss": False}}
    out = metrics.safeness({"a_loss": 1.0}, {"a_loss": 1.0}, tasks)
    assert out["eta_hat"] == 100.0 and out["delta_i"] == 0.0
    with pytest.raises(KeyError, match="'a_loss' of task 'a'.*reference"):
        metrics.safeness({"a_loss": 1.0}, {}, tasks)
    with pytest.raises(ValueError, match="no metric"):
        metrics.safeness({}, {}, {"a": {}})


def test_task_metrics_groups_each_tasks_metrics():
    assert metrics.task_metrics([classification("a", 2), classification("b", 3)]) == {
        "a": {"a_accuracy": True}, "b": {"b_accuracy": True}}
