"""Blocks: backbone layers with conditioning sites (`Block`), and the units
the backbones are made of."""

import keras

from tf_mtl._keras import flatten_layers
from tf_mtl.layers.base import TaskAware, apply_task_aware
from tf_mtl.layers.passing import check_spec, layer_passing
from tf_mtl.layers.per_task import (
    PerTaskBatchNormalization,
    PerTaskConv2D,
    PerTaskDense,
)
from tf_mtl.layers.task_batch_norm import NORM_MOMENTUM, TaskBatchNormalization


def _apply(layer, x, task_ids, training):
    """Calls a plain layer on `x`, a `TaskAware` one on `(x, task_ids)`."""
    if isinstance(layer, TaskAware):
        return layer(x, task_ids, training=training)
    return layer(x, training=training)


@keras.saving.register_keras_serializable(package="tf_mtl")
class Block(keras.layers.Layer):
    """A backbone layer holding conditioning sites.

    Subclasses create their sublayers in `__init__` (per-task copies when
    `num_tasks` is set), declare the channels of each site in
    `site_channels` and write their computation as `stages()`: stage s runs
    before site s, the last one after every site. A stage maps
    `(state, task_ids, training)` to the next state, a tuple whose first
    tensor is what the next site sees (the rest, e.g. a residual branch,
    rides along and is routed with it). So the model can start a block's
    routed part at the site where its rows enter it (`shared_stages`,
    `run_until` / `run_from`: sequential routing runs the part before once).
    A block that cannot be split overrides `call` and routes its rows
    before its first layer.

    Called as `block(x, task_ids, training=..., route=route)` it returns
    `(x, task_ids)` (`tf_mtl.layers.routes`); called as `block(x)`, a block
    that routes nothing in that mode is a plain Keras layer returning `x`.
    """

    site_channels = ()
    site_layers = ()  # the convolution or dense layer of each site

    def __init__(self, num_tasks=None, passing=None, kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        if (passing is not None or kernel_regularizer is not None) and not num_tasks:
            raise ValueError(f"Block {self.name!r}: passing and kernel regularizers are "
                             "for per-task layers (`num_tasks`).")
        self.num_tasks = num_tasks
        self.passing = passing and check_spec(passing)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.conditioned = {}

    # Sublayers: plain, or per-task copies (passed ones with `passing`,
    # `tf_mtl.layers.passing.passing_spec`; convolution and dense kernels
    # penalised by `kernel_regularizer`).

    def _conv(self, filters, kernel_size, strides=1, padding="same", dilation_rate=1):
        if self.num_tasks:
            return PerTaskConv2D(self.num_tasks, filters, kernel_size, strides=strides,
                                 padding=padding, use_bias=False,
                                 kernel_regularizer=self.kernel_regularizer,
                                 dilation_rate=dilation_rate, **layer_passing(self.passing))
        return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                                   dilation_rate=dilation_rate, use_bias=False)

    def _norm(self):
        if self.num_tasks:
            return PerTaskBatchNormalization(
                self.num_tasks, momentum=NORM_MOMENTUM,
                **layer_passing(self.passing, normalization=True))
        return TaskBatchNormalization(momentum=NORM_MOMENTUM)

    def _dense(self, units):
        if self.num_tasks:
            return PerTaskDense(self.num_tasks, units, kernel_regularizer=self.kernel_regularizer,
                                **layer_passing(self.passing))
        return keras.layers.Dense(units)

    def condition(self, site, layer):
        """Puts the task-conditioned `layer` at site number `site`."""
        if not 0 <= site < len(self.site_channels):
            raise ValueError(
                f"Block {self.name!r} has {len(self.site_channels)} sites. "
                f"Received: site={site}"
            )
        if not layer.built:
            # Conditioned layers hold per-channel state: build it now, so the
            # optimizer sees it even though inference never calls the layer.
            layer.build((None, self.site_channels[site]))
        self.conditioned[str(site)] = layer

    def routes_tasks(self, training):
        return bool(self.num_tasks) or any(
            l.routes_tasks(training) for l in self.conditioned.values())

    def shared_stages(self, training):
        """How many of the block's stages run on rows without a task before
        its rows enter the routed part in this mode: 0 where they enter
        before its first layer (a per-task block; a block without stages
        runs as a whole), s + 1 where they enter at site s (its first
        conditioned layer that routes), and all of them where it routes
        nothing."""
        if self.num_tasks or type(self).stages is Block.stages:
            return 0
        routing = [int(site) for site, layer in self.conditioned.items()
                   if layer.routes_tasks(training)]
        return min(routing) + 1 if routing else len(self.stages())

    def stages(self):
        """The computation between the sites (see the class docstring)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no `stages`: define them, or override "
            "`call` (the block is then routed before its first layer).")

    def call(self, x, task_ids=None, training=None, route=None):
        if task_ids is None and route is None:
            if self.routes_tasks(training):
                raise ValueError(
                    f"{type(self).__name__} {self.name!r} routes tasks in this mode "
                    f"(training={training}): call it as `block(x, task_ids, route=...)` "
                    "or run it in a `tf_mtl.MultiTaskModel`.")
            return self.run_from(0, (x,), None, training, None)[0]
        if self.num_tasks and task_ids is None:  # routed before the first layer
            x, task_ids = route(x)
        return self.run_from(0, (x,), task_ids, training, route)

    def run_until(self, stages, x, training):
        """The state after the first `stages` stages of rows without a task."""
        state = (x,)
        for stage in self.stages()[:stages]:
            state = stage(state, None, training)
        return state

    def run_from(self, stage, state, task_ids, training, route):
        """Runs the block on `state` from stage `stage` (the site before it,
        then the stages and sites after it); returns the output and the
        task of each row (None if not routed)."""
        stages = self.stages()
        for s in range(stage, len(stages)):
            if s > 0:
                state, task_ids = self._site(s - 1, state, task_ids, training, route)
            state = stages[s](state, task_ids, training)
        return state[0], task_ids

    def conditioned_layers(self):
        return list(self.conditioned.values())

    def keep_task_statistics(self, num_tasks):
        """Gives the block's `TaskBatchNormalization`s per-task moving
        statistics (`MultiTaskModel`, where inference is per task)."""
        for layer in flatten_layers(self, include_self=False):
            if isinstance(layer, TaskBatchNormalization):
                layer.keep_task_statistics(num_tasks)

    def site_kernel(self, site):
        """The kernel of the layer whose channels site `site` sees."""
        if site >= len(self.site_layers):
            raise ValueError(
                f"{type(self).__name__} {self.name!r} names no layer for site {site}: "
                "define `site_layers` (one convolution or dense layer per site).")
        return self.site_layers[site].kernel

    def _site(self, site, state, task_ids, training, route):
        layer = self.conditioned.get(str(site))
        if layer is None:
            return state, task_ids
        x, routed = apply_task_aware(layer, state[0], task_ids, training, route)
        carried = state[1:]
        if task_ids is None and routed is not None:  # the rest enters with it
            carried = [route(tensor)[0] for tensor in carried]
        return (x, *carried), routed

    def get_config(self):
        return {
            **super().get_config(),
            "num_tasks": self.num_tasks,
            "passing": self.passing,
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "conditioned": {site: keras.saving.serialize_keras_object(layer)
                            for site, layer in self.conditioned.items()},
        }

    def build(self, input_shape):
        # Sublayers are made in `__init__` and build at their first call; a
        # block with state of its own to make from the input shape (a
        # residual shortcut) overrides this.
        self.built = True

    def get_build_config(self):
        # Blocks build their sublayers at their first call (the model's
        # construction), not from a saved input shape; a saved one would
        # make Keras mark a reloaded block built before its build() ran.
        return None

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        conditioned = config.pop("conditioned", {})
        block = cls(**config)
        for site, layer in sorted(conditioned.items()):
            block.condition(int(site), keras.saving.deserialize_keras_object(layer))
        return block


@keras.saving.register_keras_serializable(package="tf_mtl")
class ConvUnit(Block):
    """Conv2D -> BatchNorm -> [site] -> activation -> optional max-pool
    (`pool_strides` default: `pool_size`)."""

    def __init__(self, filters, kernel_size=3, strides=1, padding="same",
                 pool_size=None, activation="relu", num_tasks=None, dilation_rate=1,
                 pool_strides=None, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.pool_size = pool_size
        self.pool_strides = pool_strides
        self.activation_name = activation
        self.dilation_rate = dilation_rate
        self.conv = self._conv(filters, kernel_size, strides, padding, dilation_rate)
        self.norm = self._norm()
        self.activation = keras.layers.Activation(activation)
        self.pool = keras.layers.MaxPooling2D(
            pool_size, pool_strides, padding="same" if pool_strides else "valid"
        ) if pool_size else None

    @property
    def site_channels(self):
        return (self.filters,)

    @property
    def site_layers(self):
        return (self.conv,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "pool_size": self.pool_size,
                "pool_strides": self.pool_strides, "activation": self.activation_name,
                "dilation_rate": self.dilation_rate}

    def stages(self):
        return self._convolve, self._activate

    def _convolve(self, state, task_ids, training):
        (x,) = state
        return (self.norm(_apply(self.conv, x, task_ids, training), task_ids,
                          training=training),)

    def _activate(self, state, task_ids, training):
        x = self.activation(state[0])
        return (self.pool(x) if self.pool is not None else x),


@keras.saving.register_keras_serializable(package="tf_mtl")
class DenseUnit(Block):
    """Dense -> [site] -> activation."""

    def __init__(self, units, activation="relu", num_tasks=None, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.units = units
        self.activation_name = activation
        self.dense = self._dense(units)
        self.activation = keras.layers.Activation(activation)

    @property
    def site_channels(self):
        return (self.units,)

    @property
    def site_layers(self):
        return (self.dense,)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": self.activation_name}

    def stages(self):
        return self._project, self._activate

    def _project(self, state, task_ids, training):
        return (_apply(self.dense, state[0], task_ids, training),)

    def _activate(self, state, task_ids, training):
        return (self.activation(state[0]),)


@keras.saving.register_keras_serializable(package="tf_mtl")
class ResidualUnit(Block):
    """A basic ResNet block (He et al. 2016) with a site after each of its
    two convolutions' normalisation; the projection shortcut has no site.
    """

    def __init__(self, filters, strides=1, num_tasks=None, dilation_rate=1, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.filters = filters
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.conv1 = self._conv(filters, 3, strides, dilation_rate=dilation_rate)
        self.conv2 = self._conv(filters, 3, dilation_rate=dilation_rate)
        self.norm1, self.norm2 = self._norm(), self._norm()
        self.shortcut = None

    @property
    def site_channels(self):
        return (self.filters, self.filters)

    @property
    def site_layers(self):
        return (self.conv1, self.conv2)

    output_channels = property(lambda self: self.filters)

    def build(self, input_shape):
        if self.strides != 1 or input_shape[-1] != self.output_channels:
            # A strided 1x1 convolution is a subsampling, then a 1x1 one: the
            # same values, and oneDNN (TF 2.21, AVX-512 CPUs) corrupts its
            # heap in the strided one's filter gradient at some odd batch
            # sizes (4 -> 8 channels, batch 1, 3, 7, 9).
            self.shortcut = [keras.layers.MaxPooling2D(1, self.strides),
                             self._conv(self.output_channels, 1), self._norm()]

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "strides": self.strides, "dilation_rate": self.dilation_rate}

    def stages(self):
        # The state is (residual branch, shortcut).
        return self._first, self._second, self._merge

    def _first(self, state, task_ids, training):
        (x,) = state
        skip = x
        if self.shortcut is not None:
            subsample, conv, norm = self.shortcut
            skip = norm(_apply(conv, subsample(x), task_ids, training), task_ids,
                        training=training)
        return self.norm1(_apply(self.conv1, x, task_ids, training), task_ids,
                          training=training), skip

    def _second(self, state, task_ids, training):
        h, skip = state
        h = _apply(self.conv2, keras.ops.relu(h), task_ids, training)
        return self.norm2(h, task_ids, training=training), skip

    def _merge(self, state, task_ids, training):
        h, skip = state
        return (keras.ops.relu(h + skip),)


@keras.saving.register_keras_serializable(package="tf_mtl")
class BottleneckUnit(ResidualUnit):
    """The bottleneck block of ResNet-50 (He et al. 2016; stride on the 3x3
    convolution, as torchvision): 1x1 to `filters`, 3x3 (strided or
    dilated), 1x1 to `4 * filters`, a site after each normalisation, plus
    the shortcut (projected where the shape changes, without a site).
    """

    expansion = 4
    output_channels = property(lambda self: self.expansion * self.filters)

    def __init__(self, filters, strides=1, num_tasks=None, dilation_rate=1, **kwargs):
        Block.__init__(self, num_tasks, **kwargs)
        self.filters = filters
        self.strides = strides
        self.dilation_rate = dilation_rate
        self.conv1 = self._conv(filters, 1)
        self.conv2 = self._conv(filters, 3, strides, dilation_rate=dilation_rate)
        self.conv3 = self._conv(self.output_channels, 1)
        self.norm1, self.norm2, self.norm3 = self._norm(), self._norm(), self._norm()
        self.shortcut = None

    @property
    def site_channels(self):
        return (self.filters, self.filters, self.output_channels)

    @property
    def site_layers(self):
        return (self.conv1, self.conv2, self.conv3)

    def stages(self):
        return self._first, self._second, self._third, self._merge

    def _third(self, state, task_ids, training):
        h, skip = state
        h = _apply(self.conv3, keras.ops.relu(h), task_ids, training)
        return self.norm3(h, task_ids, training=training), skip


def scaled(channels, width):
    """`channels` times the width multiplier, at least 1."""
    if not width > 0:
        raise ValueError(f"`width` must be > 0. Received: width={width}")
    return max(1, round(channels * width))
