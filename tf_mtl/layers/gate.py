"""Safe MTL gates: per task, how much of the public and the private encoder.

Guo, Ye and Zhang, "Safe Multi-Task Learning" (papers/002); equation numbers
are the paper's.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_mtl.layers.base import TaskConditioned, draw_counter, next_seed


@keras.saving.register_keras_serializable(package="tf_mtl")
class EncoderGate(TaskConditioned):
    """The gate g_t of SMTL (eq. 1): `a_t * public + (1 - a_t) * private`.

    `layer(public, private, task_ids)`: row i mixes its task's a_t. With
    a_t = 0 the task is single-task learning on its private encoder, with
    a_t = 1 hard sharing on the public one.

    - Soft (`lite=False`, SMTL): a_t in [0, 1] is the first of a softmax over
      two logits per task, initialised equal (a_t = 1/2), as in the reference
      code.
    - Hard (`lite=True`, L-SMTL): a_t in {0, 1}. `public_probs` s_t =
      sigmoid(logit_t), initialised at 1/2, is the probability of choosing
      the public encoder. Training draws a_t by the Gumbel-max trick,
      `argmax_k(log p_k + b_k)` over p = (1 - s_t, s_t) (eq. 3), and takes
      the gradient of its relaxation `softmax((log p + b) / tau)` (eq. 4):
      straight-through, one draw per forward pass for the whole batch as in
      the reference code (tau = 0.1 there, constant). At inference the
      choice is deterministic, a_t = [s_t > 1/2], so an export keeps only
      the chosen encoder.

    The reference code's lite gate holds the *private* encoder's
    probability; here s_t is the paper's alpha_t (the public one's): the same
    family, with the logit's sign flipped.

    Args:
        num_tasks: T.
        lite: hard (L-SMTL) gate instead of the soft (SMTL) one.
        tau: temperature of the relaxation (lite gate).
        seed: seed of the Gumbel draws (lite gate); draw i uses `(seed, i)`
            and the draw count is a weight, so a resumed run draws alike.

    Example:

    >>> public, private = keras.Input((8,)), keras.Input((8,))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = EncoderGate(num_tasks=3, lite=True)(public, private, task_ids)
    """

    float32_state = True

    def __init__(self, num_tasks, lite=False, tau=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 1:
            raise ValueError(f"`num_tasks` must be >= 1. Received: {num_tasks}")
        if not tau > 0:
            raise ValueError(f"`tau` must be > 0. Received: tau={tau}")
        self.num_tasks = int(num_tasks)
        self.lite = bool(lite)
        self.tau = float(tau)
        self.seed = int(np.random.randint(2**31 - 1) if seed is None else seed)

    def build(self, public_shape, private_shape=None, task_ids_shape=None):
        shape = (self.num_tasks,) if self.lite else (self.num_tasks, 2)
        self.logits = self.add_weight(shape=shape, initializer="zeros", name="logits")
        if self.lite:
            self.draws = draw_counter(self)

    def public_weight(self, training=False):
        """a_t of every task, `(T,)`: the weight of the public encoder."""
        if not self.lite:
            return tf.nn.softmax(self.logits, axis=-1)[:, 0]
        if not training:
            return tf.cast(self.logits > 0.0, tf.float32)  # s_t > 1/2
        s = tf.sigmoid(self.logits)
        log_p = tf.math.log(tf.stack([1.0 - s, s], -1))  # (private, public)
        uniform = tf.random.stateless_uniform(
            tf.shape(log_p), next_seed(self.seed, self.draws), minval=1e-20, maxval=1.0)
        scores = log_p - tf.math.log(-tf.math.log(uniform))  # + Gumbel(0, 1)
        relaxed = tf.nn.softmax(scores / self.tau, axis=-1)[:, 1]
        hard = tf.cast(scores[:, 1] > scores[:, 0], tf.float32)
        return hard + (relaxed - tf.stop_gradient(relaxed))  # exactly 0 / 1 forward

    def public_probs(self):
        """The gate's probability (lite) or weight (soft) of the public
        encoder, `(T,)`: what the paper plots as alpha_t."""
        if self.lite:
            return tf.sigmoid(self.logits)
        return self.public_weight()

    def call(self, public, private, task_ids, training=None):
        alpha = tf.gather(self.public_weight(training), tf.cast(task_ids, tf.int32))
        alpha = tf.reshape(tf.cast(alpha, public.dtype), [-1] + [1] * (len(public.shape) - 1))
        return alpha * public + (1.0 - alpha) * private

    def compute_output_shape(self, public_shape, private_shape=None, task_ids_shape=None):
        return public_shape

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "lite": self.lite,
                "tau": self.tau, "seed": self.seed}
