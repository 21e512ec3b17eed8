"""Hyperparameters fitted on held-out data through one virtual step of the
network: Safe MTL's gates (papers/002, section 4.4) and Auto-Lambda's task
weights (`tf_mtl.weighting.AutoLambda`).

Both solve `min_h L_val(w*(h), h)` with `w*(h) = argmin_w L_train(w, h)`,
approximated by one step: `w' = w - xi grad_w L_train(w, h)`.
"""

import keras
import tensorflow as tf

from tf_mtl.objective import all_replicas_sum


def hypergradients(model, train, heldout, network, hyper, virtual_learning_rate,
                   train_weights=None, heldout_optimizer=None):
    """`d L_val(w - xi grad_w L_train(w, h), h) / d h`, exactly.

    The gradient flows through `grad_w L_train` (second order, where the
    reference codes approximate the Hessian-vector product by finite
    differences); `virtual_learning_rate=None` is the first-order version,
    `d L_val(w, h) / d h`. The virtual step is plain SGD, whatever the
    network's optimizer. The virtual passes change no state: no
    normalisation statistics, draw count or metric moves (they run in a
    `keras.StatelessScope`), so with tiled routing they see the draws the
    real step will (one pass per task, `routing="sequential"`, draws once
    per pass where the virtual pass draws once).

    Args:
        model: a `MultiTaskModel`; `L` is its objective on a batch
            (`model.batch_objective`, this replica's share).
        train, heldout: a batch of each.
        network: w, the variables of the virtual step.
        hyper: h, the variables differentiated.
        virtual_learning_rate: xi (a float or a scalar tensor), or None.
        train_weights: the task weights of `L_train` (Auto-Lambda's lambda);
            None: equal. `L_val` always weights tasks equally.
        heldout_optimizer: the optimizer that applies the result: it scales
            `L_val` (mixed precision).
    """
    with tf.GradientTape() as outer:
        outer.watch([h.value for h in hyper])  # trainable or not
        mapping = []
        if virtual_learning_rate is not None:
            with tf.GradientTape() as inner, keras.StatelessScope():
                scaled = model.optimizer.scale_loss(
                    model.batch_objective(train, training=True, weights=train_weights))
            scale = getattr(model.optimizer, "dynamic_scale", 1.0)  # mixed precision
            gradients = [g if g is None else all_replicas_sum(tf.convert_to_tensor(g)) / scale
                         for g in inner.gradient(scaled, network)]
            mapping = [(w, w - virtual_learning_rate * g)
                       for w, g in zip(network, gradients) if g is not None]
        with keras.StatelessScope(state_mapping=mapping):
            heldout_loss = model.batch_objective(heldout, training=True)
            if heldout_optimizer is not None:
                heldout_loss = heldout_optimizer.scale_loss(heldout_loss)
    return outer.gradient(heldout_loss, hyper)
