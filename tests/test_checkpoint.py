"""tf_mtl.checkpoint: the selected epoch, unreadable epochs, one run per folder,
a resumed `fit`."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mtl.checkpoint import (
    Checkpoint, CheckpointError, Selection, exclusive_folder, fit_resumed)
from tf_mtl.tasks import classification, depth

TASKS = [classification("a", 3), classification("b", 3), depth("d", (4, 4))]
EPOCHS = [{"val_loss": 3.0, "val_a_accuracy": 0.5, "val_b_accuracy": 0.4},
          {"val_loss": 2.0, "val_a_accuracy": 0.6, "val_b_accuracy": 0.2},
          {"val_loss": 2.5, "val_a_accuracy": 0.7, "val_b_accuracy": 0.3}]


@pytest.mark.parametrize("criterion, best", [
    ("val_loss", 2),            # lowest
    ("val_a_accuracy", 3),      # highest
    ("val_accuracy", 3),        # mean over a and b: 0.45, 0.40, 0.50
    ("last", 3),
])
def test_selection_picks_the_papers_epoch(criterion, best):
    assert Selection(criterion, TASKS).best(EPOCHS) == best


def test_selection_never_picks_a_diverged_epoch_and_refuses_unknown_criteria():
    diverged = [{"val_loss": 1.0}, {"val_loss": float("nan")}, {"val_loss": 0.5}]
    assert Selection("val_loss", TASKS).best(diverged) == 3
    assert Selection("val_d_absolute_error", TASKS).higher is False
    with pytest.raises(ValueError, match="val_accuracy, .*val_a_loss"):
        Selection("val_f_score", TASKS)
    with pytest.raises(ValueError, match="Unknown selection criterion 'loss'"):
        Selection("loss", TASKS)


def _model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.build_optimizer = lambda: model.optimizer.build(model.trainable_variables)
    return model


def _write(folder, model, epoch_logs, selection=None):
    checkpoint = Checkpoint(str(folder), selection=selection)
    checkpoint.set_model(model)
    for epoch, logs in enumerate(epoch_logs):
        model.layers[0].kernel.assign(np.full((2, 1), epoch + 1.0, "float32"))
        checkpoint.on_epoch_end(epoch, logs)
    return checkpoint


def test_the_selected_epoch_is_kept_beside_the_last(tmp_path):
    model = _model()
    checkpoint = _write(tmp_path, model, EPOCHS, Selection("val_loss", TASKS))
    assert sorted(os.listdir(tmp_path)) == ["epoch_2", "epoch_3"]
    assert checkpoint.selected_epoch() == 2
    model.load_weights(checkpoint.weights_path(2))
    np.testing.assert_array_equal(model.layers[0].kernel, np.full((2, 1), 2.0))


def test_an_unreadable_epoch_falls_back_to_the_one_before(tmp_path, capsys):
    _write(tmp_path, _model(), EPOCHS, Selection("val_loss", TASKS))
    state = tmp_path / "epoch_3" / "state.weights.h5"
    state.write_bytes(state.read_bytes()[:100])  # cut short
    model = _model()
    checkpoint = Checkpoint(str(tmp_path))
    assert checkpoint.restore(model) == 2
    assert "epoch_3" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["epoch_2"]
    np.testing.assert_array_equal(model.layers[0].kernel, np.full((2, 1), 2.0))
    (tmp_path / "epoch_2" / "state.weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)epoch_2.*--noresume"):
        Checkpoint(str(tmp_path)).restore(_model())


def test_a_checkpoint_of_another_model_names_its_file(tmp_path):
    _write(tmp_path, _model(), EPOCHS[:1])
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    other.compile(optimizer="sgd", loss="mse")
    other.build_optimizer = lambda: other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="epoch_1: ValueError"):
        Checkpoint(str(tmp_path)).restore(other)


def test_one_run_holds_a_folder(tmp_path):
    with exclusive_folder(str(tmp_path)):
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {os.getpid()}"):
            with exclusive_folder(str(tmp_path)):
                pass
    with exclusive_folder(str(tmp_path)):  # released
        pass


def _regression(seed):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.set_weights([np.full((2, 1), float(seed), "float32"), np.zeros(1, "float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.build_optimizer = lambda: model.optimizer.build(model.trainable_variables)
    return model


def test_fit_resumed_continues_a_run_and_reports_its_selected_epoch(tmp_path):
    x = np.random.RandomState(0).normal(size=(32, 2)).astype("float32")
    batches = lambda y: tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    train = batches(x.sum(1, keepdims=True))
    # A validation set the model fits worse the longer it trains: epoch 1 wins.
    validation = batches(-x.sum(1, keepdims=True))

    def run(model, epochs, folder="run"):
        checkpoint = Checkpoint(str(tmp_path / folder), selection=Selection("val_loss", TASKS))
        return fit_resumed(model, checkpoint, train, epochs, validation,
                           validation_data=validation, verbose=0)

    whole = _regression(0)
    history, best, last = run(whole, 3, "whole")
    run(_regression(0), 2)
    resumed = _regression(0)
    history_r, best_r, last_r = run(resumed, 3)  # trains epoch 3 only
    assert len(history_r["loss"]) == 3 and history_r == history
    assert best["epoch"] == 1 and last["epoch"] == 3 and best_r == best and last_r == last
    np.testing.assert_array_equal(resumed.get_weights()[0], whole.get_weights()[0])
    with pytest.raises(CheckpointError, match="holds 3 epochs, more than the 2"):
        run(_regression(0), 2)
