"""The small convex problems over task weights that MGDA and CAGrad solve."""

import tensorflow as tf


def min_norm_on_simplex(gramian, max_iterations=None):
    """`argmin_w w^T G w` over the probability simplex, exactly: the weights
    of the min-norm point of the convex hull of the task gradients, `G`
    (`gramian`, T x T) their Gram matrix.

    Wolfe's algorithm ("Finding the nearest point in a polytope", 1976) on
    G: it keeps a set S of vertices and w the min-norm point of their
    affine hull (a (|S| + 1) linear system), which is exact. While some
    weight of w is not positive it steps back towards the previous point
    and drops a vertex; otherwise w is optimal unless a vertex g_j has
    `g_j . x < ||x||^2` (x = sum_t w_t g_t), which joins S. It ends in
    finitely many steps at the optimum, also where it lies on a face of
    the simplex, where Frank-Wolfe only approaches it. `max_iterations`
    (default 20 T) bounds the loop against cycling by rounding; random
    problems up to T = 8 end within 2 T.
    """
    dtype = gramian.dtype
    g = tf.cast(gramian, tf.float64)
    n = tf.shape(g)[0]
    diag = tf.linalg.diag_part(g)
    g = g / tf.maximum(tf.reduce_max(diag), 1e-300)  # w is scale-free; tolerances absolute
    tolerance = tf.constant(1e-10, tf.float64)
    ones = tf.ones([1, 1], tf.float64)

    def affine_minimum(active):
        # [[G_SS, 1], [1^T, 0]] [v; -mu] = [0; 1], identity rows off S.
        a = tf.cast(active, tf.float64)
        kkt = tf.concat([
            tf.concat([g * a[:, None] * a[None, :] + tf.linalg.diag(1.0 - a), a[:, None]], 1),
            tf.concat([a[None, :], 0.0 * ones], 1)], 0)
        rhs = tf.concat([tf.zeros([n, 1], tf.float64), ones], 0)
        return tf.linalg.lstsq(kkt, rhs, fast=False)[:n, 0] * a

    def accept(w, active, v):
        gv = tf.linalg.matvec(g, v)
        j = tf.argmin(gv, output_type=tf.int32)
        optimal = (gv[j] >= tf.tensordot(v, gv, 1) - tolerance) | active[j]
        return v, active | (tf.one_hot(j, n, on_value=True, off_value=False) & ~optimal), optimal

    def step_back(w, active, v):
        # The farthest point towards v that keeps every weight >= 0: the
        # least w_i / (w_i - v_i) (in (0, 1]) over the weights v makes <= 0.
        blocking = active & (v <= 0.0)
        ratios = tf.where(blocking, w / tf.where(blocking, w - v, 1.0), 2.0)
        drop = tf.argmin(ratios, output_type=tf.int32)
        w = w + ratios[drop] * (v - w)
        active &= (w > 0.0) & ~tf.one_hot(drop, n, on_value=True, off_value=False)
        w = tf.where(active, w, 0.0)
        return w / tf.reduce_sum(w), active, tf.constant(False)

    def body(i, w, active, done):
        v = affine_minimum(active)
        feasible = tf.reduce_all(tf.where(active, v > 0.0, True))
        return (i + 1, *tf.cond(feasible, lambda: accept(w, active, v),
                                lambda: step_back(w, active, v)))

    first = tf.one_hot(tf.argmin(diag, output_type=tf.int32), n, dtype=tf.float64)
    limit = 20 * n if max_iterations is None else max_iterations
    _, w, _, _ = tf.while_loop(lambda i, w, active, done: ~done & (i < limit), body,
                               (tf.constant(0), first, first > 0.0, tf.constant(False)))
    return tf.cast(w, dtype)


def min_on_simplex(gramian, linear, scale, iterations=250, tolerance=1e-7):
    """`argmin_w  w^T G b + k sqrt(w^T G w)` over the probability simplex.

    `G` is `gramian` (T x T), `b` `linear` (T,), `k` `scale` >= 0. With
    `b = 1/T, k = c ||g_0||` this is CAGrad's dual (eq. 5) (with `b = 0,
    k = 1`, MGDA's min-norm point, which `min_norm_on_simplex` solves
    exactly).
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
