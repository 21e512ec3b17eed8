"""The small convex problem over task weights that MGDA and CAGrad solve."""

import tensorflow as tf


def min_on_simplex(gramian, linear, scale, iterations=250, tolerance=1e-7):
    """`argmin_w  w^T G b + k sqrt(w^T G w)` over the probability simplex.

    `G` is `gramian` (T x T), `b` `linear` (T,), `k` `scale` >= 0. With
    `b = 0, k = 1` this is MGDA's min-norm point of the convex hull of the
    task gradients; with `b = 1/T, k = c ||g_0||` CAGrad's dual (eq. 5).
    Solved by Frank-Wolfe (Sener and Koltun, Algorithm 2) from the uniform
    weights: each iteration moves towards the vertex of least gradient by
    the exact minimiser on that segment (closed form below), until the
    weights move less than `tolerance`. For T = 2 the first step is exact.
    """
    num_tasks = tf.shape(gramian)[0]
    gb = tf.linalg.matvec(gramian, linear)
    eye = tf.eye(num_tasks)

    def step(i, w, change):
        gw = tf.linalg.matvec(gramian, w)
        quadratic = tf.tensordot(w, gw, 1)
        norm = tf.sqrt(tf.maximum(quadratic, 1e-20))
        t = tf.argmin(gb + scale * gw / norm, output_type=tf.int32)
        gamma = _segment_argmin(
            slope=gb[t] - tf.tensordot(w, gb, 1), scale=scale,
            start=quadratic, cross=gw[t], end=gramian[t, t])
        new = (1.0 - gamma) * w + gamma * eye[t]
        return i + 1, new, tf.reduce_sum(tf.abs(new - w))

    w0 = tf.fill([num_tasks], 1.0 / tf.cast(num_tasks, gramian.dtype))
    _, w, _ = tf.while_loop(
        lambda i, w, change: (i < iterations) & (change > tolerance), step,
        (tf.constant(0), w0, tf.constant(1.0)))
    return w


def _segment_argmin(slope, scale, start, cross, end):
    """`argmin_{gamma in [0, 1]} m gamma + k sqrt(s(gamma))` with
    `s(gamma) = ||(1 - gamma) v + gamma g||^2`, given `m` (`slope`), `k`,
    `v.v` (`start`), `v.g` (`cross`) and `g.g` (`end`).

    `s = Q (gamma - gamma_0)^2 + R` with `Q = ||v - g||^2`,
    `gamma_0 = (v.v - v.g) / Q`, `R = v.v - Q gamma_0^2`; setting the
    derivative to 0 gives `u = gamma - gamma_0 = -sign(m) |m|
    sqrt(R / (Q (k^2 Q - m^2)))` when `k^2 Q > m^2`; otherwise the function
    is monotone and the minimum is the end `m` points away from.
    """
    q = start - 2.0 * cross + end
    safe_q = tf.maximum(q, 1e-20)
    gamma0 = (start - cross) / safe_q
    r = tf.maximum(start - safe_q * gamma0 ** 2, 0.0)
    room = scale ** 2 * safe_q - slope ** 2
    u = -tf.sign(slope) * tf.abs(slope) * tf.sqrt(
        tf.math.divide_no_nan(r, safe_q * tf.maximum(room, 1e-30)))
    inner = tf.where(room > 0, gamma0 + u, tf.where(slope > 0, 0.0, 1.0))
    return tf.where(q > 1e-20, tf.clip_by_value(inner, 0.0, 1.0),
                    tf.where(slope > 0, 0.0, tf.where(slope < 0, 1.0, 0.0)))
