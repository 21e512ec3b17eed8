"""MPPS neuron masks: a learnable mask distribution per task and channel.

Shi et al., "Deep Multitask Learning with Progressive Parameter Sharing",
ICCV 2023 (papers/001; appendix papers/000). Section and equation numbers
below are the paper's.
"""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_mtl.layers.base import (
    TaskConditioned, draw_counter, mask_channels, next_seed, task_weights)

tfd = tfp.distributions

DISTRIBUTIONS = ("bernoulli", "gaussian", "gaussian_matched")
SAMPLE_PER = ("task", "example")


def exclusive_init(num_tasks, channels, eps):
    """Exclusive initialisation (section 3.5), a `(T, C)` array.

    The channels are split into T contiguous parts; task t owns part t with
    probability `1 - eps` and is a guest elsewhere with probability `eps`.
    Its EC is the highest possible, `1 - eps`.
    """
    probs = np.full((num_tasks, channels), eps, "float32")
    for task, part in enumerate(np.array_split(np.arange(channels), num_tasks)):
        probs[task, part] = 1.0 - eps
    return probs


def exclusive_capacity(probs):
    """Exclusive capacity of each channel (section 3.3), shape `(C,)`:

        EC = 1 - (sum_t phi[t] - max_t phi[t]) / (T - 1)

    `probs` is `(T, C)`. 1 - eps when one task owns the channel alone,
    eps when every task uses it with probability 1 - eps.
    """
    probs = tf.convert_to_tensor(probs)
    guests = tf.reduce_sum(probs, 0) - tf.reduce_max(probs, 0)
    return 1.0 - guests / (probs.shape[0] - 1)


# How close to C_i the target update brings the EC: far below any
# schedule's step and float32's resolution, above float64's rounding of EC.
TOLERANCE = 1e-9


def rescale_capacity(probs, capacity, eps, iterations=48):
    """Target update of Algorithm 1, `Pi = 1 - (C_i / C) * (1 - Phi)`,
    exact under clipping.

    The remaining capacity `1 - Phi` of each channel is rescaled so that the
    target's EC becomes `capacity` (C_i): for each channel,
    EC(Pi) = (C_i / C) * EC(Phi) while nothing is clipped.

    Reading: Algorithm 1 writes `C = 1 - (sum_t Phi - max_t Phi)`, without
    the 1/(T-1) of the EC definition (3.3). The two agree for T = 2. For
    T > 2 the unnormalised C can be zero or negative (two guests at 0.6
    already give C < 0), and even where positive it does not give the target
    the EC C_i that eq. (4) asks for. We use C = EC(Phi), the normalised one,
    which makes EC(Pi) = C_i for every T.

    Pi must stay in [eps, 1 - eps]. Where the clip binds (a schedule asking
    more exclusivity than Phi has pushes guests below eps; less, above
    1 - eps), `C_i / C` would miss C_i (by up to 0.11 in review); instead
    each channel's factor k in `Pi = clip(1 - k (1 - Phi))` is found by
    bisection so that EC(Pi) = C_i: EC grows with k from eps (k = 0) to
    1 - eps (k = 1 / eps), so every C_i in [eps, 1 - eps] is reached, and
    where nothing clips k is `C_i / C`, Algorithm 1's.

    EC is flat at 1 - eps for every k >= 1 of the exclusive initialisation
    (the guests clip at eps, the owner is anything above them) up to
    k = 1 / eps, where the owner clips at eps too and the channel has no
    owner left. So the bisection takes the smallest k that reaches C_i,
    and C_i is clipped to [eps, 1 - eps] and reached to within `TOLERANCE`
    first: a float32 C_i = 0.99 is 0.99000000954 in float64, above the
    1 - eps any k reaches, and without both every channel's k would run to
    1 / eps and every probability to eps (task 0 would then own every
    channel, an argmax of ties).
    """
    dtype = tf.convert_to_tensor(probs).dtype
    probs = tf.cast(probs, tf.float64)
    capacity = tf.clip_by_value(tf.cast(capacity, tf.float64), eps, 1.0 - eps) - TOLERANCE
    remaining = 1.0 - probs
    target = lambda factor: tf.clip_by_value(1.0 - factor * remaining, eps, 1.0 - eps)
    low = tf.zeros(probs.shape[1:], tf.float64)
    high = tf.fill(probs.shape[1:], tf.constant(1.0 / eps, tf.float64))
    for _ in range(iterations):  # [low, high] brackets each channel's k
        middle = (low + high) / 2
        reached = exclusive_capacity(target(middle)) >= capacity
        low, high = tf.where(reached, low, middle), tf.where(reached, middle, high)
    return tf.cast(target(high), dtype)


def gaussian_scale(probs):
    """r_G(v) = sqrt((1 - v) / v) of section 3.3: N(1, r^2) has the
    variance of a Bernoulli(v) mask rescaled by 1/v (Gaussian dropout)."""
    return tf.sqrt((1.0 - probs) / probs)


def gaussian_moments(distribution, probs):
    """`(mean, std)` of the Gaussian mask of probabilities `probs`:
    `"gaussian"`, the paper's N(1, r(v)^2); `"gaussian_matched"`,
    N(v, v (1 - v)) = v N(1, r(v)^2), the mean and variance of the
    Bernoulli(v) mask itself (a guest at v = eps passes 1% of its channel,
    give or take 10%, where N(1, r^2) multiplies it by noise of std 9.95)."""
    if distribution == "gaussian":
        return tf.ones_like(probs), gaussian_scale(probs)
    return probs, tf.sqrt(probs * (1.0 - probs))


def kl_divergence(distribution, mask_probs, target_probs):
    """KL(q_Phi || p_Pi) per task, summed over channels, in closed form.

    Bernoulli: phi log(phi / pi) + (1 - phi) log((1 - phi) / (1 - pi)).
    Gaussian, q = N(m_q, s_q^2), p = N(m_p, s_p^2) (`gaussian_moments`):
    log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2.
    """
    q = tf.convert_to_tensor(mask_probs, tf.float32)
    p = tf.convert_to_tensor(target_probs, tf.float32)
    if distribution == "bernoulli":
        kl = q * tf.math.log(q / p) + (1.0 - q) * tf.math.log((1.0 - q) / (1.0 - p))
    else:
        (mean_q, std_q), (mean_p, std_p) = (gaussian_moments(distribution, v) for v in (q, p))
        ratio = tf.square(std_q / std_p)
        kl = 0.5 * (ratio - tf.math.log(ratio) - 1.0
                    + tf.square((mean_q - mean_p) / std_p))
    return tf.reduce_sum(kl, axis=-1)


@keras.saving.register_keras_serializable(package="tf_mtl")
class ProgressiveMask(TaskConditioned):
    """MPPS mask on the channels of a layer, one distribution per task.

    For channel c and task t the mask is drawn from a Bernoulli(phi[t, c])
    or a Gaussian N(1, r(phi[t, c])^2), r(v) = sqrt((1 - v) / v) (3.3).
    The owner of a channel, argmax_t phi[t, c], always uses it (mask 1);
    guests sample. `Phi` (`mask_probs`, trainable) starts at the exclusive
    initialisation (3.5), as does the target `Pi` (`target_probs`), which
    callbacks move along the EC schedule (`tf_mtl.callbacks`). Phi is kept in
    [eps, 1 - eps] by projection after every optimizer step, and, with
    `hold_capacity`, on the target's EC as well (see below).

    Training draws one mask per task per step, as in Algorithm 1
    (`sample_per="task"`), or one per example (`"example"`): lower variance
    for the same step, at the price of `B x C` random numbers instead of
    `T x C` (the masked product costs the same). At inference
    (`training=False`) the layer is the identity: the fully shared backbone
    of section 4.1, with no random op traced.

    Objective terms (eq. 3, with the coefficient beta of the appendix):
    `beta * KL(q_Phi(., t) || p_Pi(., t))` per task, in closed form. The
    gradient of the expected loss reaches Phi by reparameterisation
    `m = 1 + r(phi) * e` for the Gaussian, and by the score function
    (REINFORCE, 3.4) for the Bernoulli, through the surrogate
    `stop_gradient(L_i - b_t) * log q_Phi(m_i, t)` per row, with
    `b_t` a moving average of task t's loss (`baseline_decay`; the paper
    uses none). The owner's mask is deterministic and adds no
    log-probability.

    Args:
        num_tasks: T, at least 2.
        distribution: `"bernoulli"` (default, the paper's main choice),
            `"gaussian"` (the paper's N(1, r(phi)^2)) or `"gaussian_matched"`
            (N(phi, phi (1 - phi)), see `gaussian_moments`).
        eps: clipping of the probabilities, 0.01 in the paper.
        beta: coefficient of the KL term (appendix 7.4), default 1.
        sample_per: `"task"` (default) or `"example"`.
        baseline_decay: decay in [0, 1) of the moving-average REINFORCE
            baseline (default 0.9), or None for the paper's plain estimator.
            The baseline matters more here than usual: Phi is projected onto
            [eps, 1 - eps], and at a guest's phi = eps the rare sample m = 1
            brings a step ~1/eps times larger than the common m = 0 one; the
            projection cuts the large steps, so without a baseline the loss
            level alone drifts guests upwards.
        hold_capacity: keep the EC of Phi, channel by channel, at the
            target's C_i after every step (`rescale_capacity`, the map of
            Algorithm 1's target update, applied to Phi) instead of leaving
            the KL term alone to hold it there (default False: the paper's
            eq. 3). The loss gradient then only moves a channel's capacity
            between its guests: what section 3.5 reads from Phi ("more
            capacity to B on the neurons whose owner is A, especially under
            such a limited total capacity") without the part of it every
            guest shares. Why the KL alone cannot
            (`benchmarks/mask_signal.md`): a guest's loss gradient is
            ~0.005 per unit of phi against a KL curvature of
            beta / (phi (1 - phi)) >= 4 beta, so at beta = 1 Phi stays
            within ~0.003 of its target, and at beta = 0.01 it leaves the
            schedule. Holding the capacity lets beta be small. With T = 2 a
            channel has one guest, whose phi the capacity then fixes.
        mask_learning_rate: Phi is trained by plain SGD at this rate
            (default 0.01; section 3.4 trains Phi "by stochastic gradient
            descent"), whatever optimizer trains the network; None trains Phi
            with the model's optimizer. Adam moves a parameter by about its
            learning rate per step however hard the KL term pulls, so under
            Adam Phi lags a short schedule by epochs (see the README).
        seed: seed of the mask samples (random when None, then kept in the
            config). Draw i uses the stateless seed `(seed, i)`, and the
            draw count is a weight, so a run resumed from a checkpoint draws
            the masks an uninterrupted run would.

    Example:

    >>> x = keras.Input((8, 8, 16))
    >>> task_ids = keras.Input((), dtype="int32")
    >>> y = ProgressiveMask(num_tasks=2)(x, task_ids)
    >>> model = keras.Model([x, task_ids], y)

    Train it in a `tf_mtl.Model` or a `MultiTaskModel`, whose steps add its
    `objective_terms` to the loss and train Phi with its own optimizer.
    """

    float32_state = True

    def __init__(self, num_tasks, distribution="bernoulli", eps=0.01, beta=1.0,
                 sample_per="task", baseline_decay=0.9, mask_learning_rate=0.01,
                 hold_capacity=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_tasks) < 2:
            raise ValueError(
                f"MPPS needs at least 2 tasks. Received: num_tasks={num_tasks}"
            )
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {DISTRIBUTIONS}. "
                f"Received: distribution={distribution!r}"
            )
        if not 0 < eps < 0.5:
            raise ValueError(f"`eps` must be in (0, 0.5). Received: eps={eps}")
        if beta < 0:
            raise ValueError(f"`beta` must be >= 0. Received: beta={beta}")
        if sample_per not in SAMPLE_PER:
            raise ValueError(
                f"`sample_per` must be one of {SAMPLE_PER}. "
                f"Received: sample_per={sample_per!r}"
            )
        if baseline_decay is not None and not 0 <= baseline_decay < 1:
            raise ValueError(
                "`baseline_decay` must be None or in [0, 1). "
                f"Received: baseline_decay={baseline_decay}"
            )
        if mask_learning_rate is not None and not mask_learning_rate > 0:
            raise ValueError(
                "`mask_learning_rate` must be None or > 0. "
                f"Received: mask_learning_rate={mask_learning_rate}"
            )
        self.num_tasks = int(num_tasks)
        self.distribution = distribution
        self.eps = float(eps)
        self.beta = float(beta)
        self.sample_per = sample_per
        self.baseline_decay = baseline_decay
        self.mask_learning_rate = mask_learning_rate
        self.hold_capacity = bool(hold_capacity)
        self._mask_optimizer = None
        self.seed = int(np.random.randint(2**31 - 1) if seed is None else seed)

    def build(self, x_shape, task_ids_shape=None):
        channels = x_shape[-1]
        if channels < self.num_tasks:
            raise ValueError(
                f"{self.name}: {channels} channels cannot be split among "
                f"{self.num_tasks} owners (section 3.5)."
            )
        init = exclusive_init(self.num_tasks, channels, self.eps)
        self.mask_probs = self.add_weight(
            shape=init.shape, name="mask_probs",
            initializer=lambda shape, dtype=None: init, constraint=self.project,
        )
        self.target_probs = self.add_weight(
            shape=init.shape, name="target_probs", trainable=False,
            initializer=lambda shape, dtype=None: init,
        )
        # The scheduler's C_i in force: its position, saved with the weights.
        self.target_capacity = self.add_weight(
            shape=(), name="target_capacity", trainable=False,
            initializer=keras.initializers.Constant(1.0 - self.eps),
        )
        self.draws = draw_counter(self)
        if self.mask_learning_rate is not None:
            # Built here, so under the strategy scope the layer is built in.
            self._mask_optimizer = keras.optimizers.SGD(self.mask_learning_rate)
            self._mask_optimizer.build([self.mask_probs])
        if self.baseline_decay is not None:
            self.baseline = self.add_weight(
                shape=(self.num_tasks,), name="baseline", trainable=False,
                initializer="zeros", aggregation="mean",
            )

    def routes_tasks(self, training):
        return bool(training)

    def project(self, probs):
        """Phi's constraint, applied after every optimizer step: clipped to
        [eps, 1 - eps] and, with `hold_capacity`, rescaled to the target's EC."""
        probs = keras.ops.clip(probs, self.eps, 1.0 - self.eps)
        if self.hold_capacity:
            probs = rescale_capacity(probs, self.target_capacity, self.eps)
        return probs

    def _distribution(self, probs):
        if self.distribution == "bernoulli":
            return tfd.Bernoulli(probs=probs, dtype=probs.dtype)
        return tfd.Normal(*gaussian_moments(self.distribution, probs))

    def _sample(self, dist):
        # One draw of the masks; tests replace it to enumerate masks exactly.
        # One mask per task is the same on every replica (Algorithm 1).
        return dist.sample(seed=next_seed(self.seed, self.draws,
                                          per_replica=self.sample_per == "example"))

    def call(self, x, task_ids, training=None):
        if not training:
            return x
        task_ids = tf.cast(task_ids, tf.int32)
        probs = tf.convert_to_tensor(self.mask_probs)
        owner = tf.one_hot(tf.argmax(probs, axis=0), self.num_tasks, axis=0,
                           on_value=True, off_value=False)
        if self.sample_per == "example":
            probs, owner = tf.gather(probs, task_ids), tf.gather(owner, task_ids)
        dist = self._distribution(probs)
        sample = self._sample(dist)
        mask = tf.where(owner, tf.ones_like(sample), sample)
        log_prob = None
        if self.distribution == "bernoulli":
            log_prob = tf.reduce_sum(
                tf.where(owner, tf.zeros_like(sample), dist.log_prob(sample)), -1
            )
        if self.sample_per == "task":
            mask = tf.gather(mask, task_ids)
            if log_prob is not None:
                log_prob = tf.gather(log_prob, task_ids)
        self.record((log_prob, task_ids))
        return mask_channels(x, mask)

    objective_name = "kl"  # its terms' value is eq. (3)'s beta * KL (the surrogate is 0)

    def dedicated_optimizer(self):
        if self._mask_optimizer is None:
            return None
        return self._mask_optimizer, [self.mask_probs]

    def kl_divergence(self):
        """KL(q_Phi(., t) || p_Pi(., t)) for each task, shape `(T,)`."""
        return kl_divergence(self.distribution, self.mask_probs, self.target_probs)

    def exclusive_capacity(self):
        """EC of each channel of Phi (3.3), shape `(C,)`."""
        return exclusive_capacity(self.mask_probs)

    def objective_terms(self, state, row_losses, row_weights):
        """Eq. (3)'s `beta * KL` of each task, weighted like that task's loss,
        and, for the Bernoulli, the REINFORCE surrogate of the rows."""
        log_prob, task_ids = state
        weights = task_weights(row_weights, task_ids, self.num_tasks)
        terms = tf.reduce_sum(weights * self.beta * self.kl_divergence())
        if log_prob is None:
            return terms  # Gaussian: Phi gets the loss gradient through the sample.
        advantage = row_losses
        if self.baseline_decay is not None:
            advantage = row_losses - tf.gather(self.baseline, task_ids)
            self._update_baseline(row_losses, task_ids)
        # Zero in value, so the logged loss stays eq. (3); its gradient is
        # the score-function estimate.
        surrogate = tf.stop_gradient(advantage) * (log_prob - tf.stop_gradient(log_prob))
        return terms + tf.reduce_sum(row_weights * surrogate)

    def _update_baseline(self, row_losses, task_ids):
        sums = tf.math.unsorted_segment_sum(row_losses, task_ids, self.num_tasks)
        counts = tf.math.bincount(task_ids, minlength=self.num_tasks,
                                  maxlength=self.num_tasks, dtype=tf.float32)
        seen = counts > 0
        means = tf.where(seen, sums / tf.maximum(counts, 1.0), self.baseline)
        decay = self.baseline_decay
        self.baseline.assign(decay * self.baseline + (1.0 - decay) * means)

    def get_config(self):
        return {
            **super().get_config(),
            "num_tasks": self.num_tasks,
            "distribution": self.distribution,
            "eps": self.eps,
            "beta": self.beta,
            "sample_per": self.sample_per,
            "baseline_decay": self.baseline_decay,
            "mask_learning_rate": self.mask_learning_rate,
            "hold_capacity": self.hold_capacity,
            "seed": self.seed,
        }
