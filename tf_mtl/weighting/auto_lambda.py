"""Auto-Lambda (Liu, Li, Johns and Davison, "Auto-Lambda: Disentangling
Dynamic Task Relationships", TMLR 2022)."""

import keras
import tensorflow as tf

from tf_mtl.bilevel import hypergradients
from tf_mtl.weighting.base import Weighting


@keras.saving.register_keras_serializable(package="tf_mtl")
class AutoLambda(Weighting):
    """Auto-Lambda: the task weights lambda are hyperparameters, fitted on
    held-out data through one virtual step of the network (the paper's
    eq. 3, every task primary):

        min_lambda sum_t L_t^val(w'),   w' = w - alpha grad_w sum_t lambda_t L_t^train(w),

    alpha the network optimizer's learning rate (or `virtual_learning_rate`).
    Every step, lambda first takes one step of its own Adam on that
    objective's gradient, then the network one on `sum_t lambda_t
    L_t^train`. The gradient is exact (`tf_mtl.bilevel.hypergradients`):
    as `L^train` is linear in lambda, it is

        d L^val(w') / d lambda_t = -alpha <grad_w L^val(w'), grad_w L_t^train(w)>,

    an inner product the authors' code takes by finite differences. (A
    "first-order" version, dropping w''s dependence on lambda, would have
    no gradient at all: lambda enters only through w'.)

    `fit` takes the held-out data as `heldout_data` (`train.py`: the
    validation split; the authors draw a second batch of the training set).
    State: lambda (non-trainable: only its own Adam moves it) and that
    Adam's slots, saved and checkpointed with the model.

    The virtual step is plain SGD (the authors' adds their SGD's momentum
    and weight decay). Under float16 loss scaling (`mixed_float16`) it is
    refused at `compile`: its held-out pass would run unscaled.

    Args:
        initial_weight: lambda at the start, for every task (0.1 in the
            authors' code).
        learning_rate: lambda's Adam (1e-4 in the authors' code for
            NYUv2 and Cityscapes).
        virtual_learning_rate: alpha; None: the network optimizer's
            current learning rate, as in the paper.

    Usage, with `model` a `tf_mtl.MultiTaskModel`:

    ```python
    model.compile("adam", weighting=tf_mtl.weighting.AutoLambda())
    model.fit(train, heldout_data=validation)
    ```
    """

    fits_on_heldout_data = True

    def __init__(self, initial_weight=0.1, learning_rate=1e-4, virtual_learning_rate=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not learning_rate > 0 or (virtual_learning_rate is not None
                                     and not virtual_learning_rate > 0):
            raise ValueError(
                "`learning_rate` and `virtual_learning_rate` must be > 0. Received: "
                f"{learning_rate}, {virtual_learning_rate}")
        if not initial_weight >= 0:
            raise ValueError(f"`initial_weight` must be >= 0. Received: {initial_weight}")
        self.initial_weight = float(initial_weight)
        self.learning_rate = float(learning_rate)
        self.virtual_learning_rate = virtual_learning_rate and float(virtual_learning_rate)
        # Made here, not in `build`: Keras may build in a stateless scope.
        self.meta_optimizer = keras.optimizers.Adam(self.learning_rate, name="lambda_adam")

    def build(self, num_tasks):
        super().build(num_tasks)
        self.lambdas = self.add_weight(
            shape=(num_tasks,), name="lambdas", trainable=False,
            initializer=keras.initializers.Constant(self.initial_weight))
        self.meta_optimizer.build([self.lambdas])

    def task_weights(self):
        return tf.convert_to_tensor(self.lambdas)

    def fit_heldout(self, model, train, heldout):
        """One step of lambda on the held-out loss after the virtual step
        (before the network's step on `train`)."""
        owners = model.variable_optimizers()
        network = [v for v in model.trainable_variables if owners[id(v)] is model.optimizer]
        alpha = self.virtual_learning_rate or model.optimizer.learning_rate
        (gradient,) = hypergradients(model, train, heldout, network, [self.lambdas], alpha,
                                     train_weights=self.lambdas,
                                     heldout_optimizer=self.meta_optimizer)
        self.meta_optimizer.apply_gradients([(gradient, self.lambdas)])

    def get_config(self):
        return {**super().get_config(), "initial_weight": self.initial_weight,
                "learning_rate": self.learning_rate,
                "virtual_learning_rate": self.virtual_learning_rate}
