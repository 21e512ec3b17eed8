"""Training data whose order is a function of (seed, epoch).

A resumed run must see, in every epoch, the batches an uninterrupted run
sees. `Dataset.shuffle(reshuffle_each_iteration=True)` cannot promise it:
its order depends on how many iterators were made before (a restarted
process starts the count again, and a dataset check that pulls one batch
moves it on). Here epoch e yields the permutation
`stateless_shuffle(range(N), seed=(seed, e))`, with e read from a variable
that `EpochOrder` sets from `fit`'s own epoch counter, which
`keras.callbacks.BackupAndRestore` restores.

Data ordered or augmented otherwise (streamed from disk, augmented per
example) take the epoch from `per_epoch`, under the same guarantee.

`tf_mtl` models add `EpochOrder` to `fit` themselves (`order_callbacks`); a
plain Keras model takes `callbacks=data.order_callbacks(train)`.
"""

import weakref

import keras
import tensorflow as tf

# id(dataset) -> (weak reference to it, its epoch variable).
_ORDERED = {}


def epoch_shuffled(arrays, batch_size, seed):
    """Batches of `arrays` (a nested structure of equal-length arrays) in the
    order `stateless_shuffle(range(N), (seed, epoch))` of the epoch in force."""
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
    arrays = tf.nest.map_structure(tf.convert_to_tensor, arrays)
    size = tf.shape(tf.nest.flatten(arrays)[0], out_type=tf.int64)[0]

    def permutation(_):
        return tf.random.experimental.stateless_shuffle(
            tf.range(size), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))

    batches = -(-int(size) // batch_size)
    dataset = (tf.data.Dataset.from_tensors(0).map(permutation).unbatch()
               .batch(batch_size)
               .map(lambda rows: tf.nest.map_structure(lambda a: tf.gather(a, rows), arrays))
               .apply(tf.data.experimental.assert_cardinality(batches))  # fit's steps
               .prefetch(tf.data.AUTOTUNE))
    return _register(dataset, epoch)


def per_epoch(make):
    """A dataset whose every iterator yields the elements of `make(epoch)`,
    `epoch` (an int64 scalar tensor) being the epoch in force when the
    iterator starts: for an order or augmentation that `make` draws from
    (seed, epoch) with stateless random ops. `order_callbacks` and tf_mtl
    models keep its epoch in step with `fit`, as for `epoch_shuffled`."""
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
    # `make` is traced here; the trace reads the epoch at each iterator's
    # first element.
    dataset = tf.data.Dataset.from_tensors(0).flat_map(
        lambda _: make(tf.identity(epoch)))
    return _register(dataset, epoch)


def _register(dataset, epoch):
    """Lets `_epoch_variable` find `epoch` from `dataset` while it lives."""
    _ORDERED[id(dataset)] = (weakref.ref(dataset), epoch)
    weakref.finalize(dataset, _ORDERED.pop, id(dataset), None)
    return dataset


def _epoch_variable(dataset):
    """The epoch variable of an `epoch_shuffled` dataset, also through
    datasets derived from it (`map`, `filter`, ...), or None."""
    entry = _ORDERED.get(id(dataset))
    if entry is not None and entry[0]() is dataset:
        return entry[1]
    for parent in getattr(dataset, "_inputs", lambda: [])():
        found = _epoch_variable(parent)
        if found is not None:
            return found
    return None


class EpochOrder(keras.callbacks.Callback):
    """Tells an `epoch_shuffled` dataset which epoch `fit` is in.

    When it knows the number of steps, Keras 3 makes the iterator of epoch
    e + 1 right after the last step of epoch e, before `on_epoch_end(e)` and
    `on_epoch_begin(e + 1)`. TensorFlow 2.21's iterators (also distributed
    ones) read the variable only at their first element, in epoch e + 1's
    first step; a pipeline that starts at once (prefetching to devices)
    would read it at creation. So the variable moves on at the end of an
    epoch's last batch too, not only at `on_epoch_begin`: every iterator
    sees its own epoch either way.
    """

    def __init__(self, epoch_variable):
        super().__init__()
        self.epoch_variable = epoch_variable
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self.epoch_variable.assign(epoch)

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        if steps and batch + 1 >= steps:
            self.epoch_variable.assign(self._epoch + 1)


def order_callbacks(dataset):
    """`[EpochOrder(...)]` for a dataset made by `epoch_shuffled` (or derived
    from one), `[]` for any other."""
    variable = _epoch_variable(dataset) if isinstance(dataset, tf.data.Dataset) else None
    return [] if variable is None else [EpochOrder(variable)]
