"""Each gradient aggregator on hand-made gradients against its definition."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_mtl import aggregation


def _aggregate(aggregator, jacobian):
    jacobian = tf.constant(jacobian, tf.float32)
    if not aggregator.built:
        aggregator.build(jacobian.shape[0])
    return aggregator.aggregate(jacobian, tf.matmul(jacobian, jacobian, transpose_b=True)).numpy()


def test_pcgrad_projects_a_conflicting_pair_onto_each_others_normal_planes():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # g1 . g2 = -1
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    np.testing.assert_allclose(_aggregate(aggregation.PCGrad(), [g1, g2]), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(expected, [0.5, 1.5])


def test_pcgrad_leaves_a_non_conflicting_pair_alone():
    jacobian = [[1.0, 0.0, 2.0], [1.0, 1.0, -0.5]]  # dot 0: no conflict
    np.testing.assert_allclose(_aggregate(aggregation.PCGrad(), jacobian),
                               np.sum(jacobian, 0), rtol=1e-6)


def test_pcgrad_with_three_tasks_follows_algorithm_1_in_its_drawn_order():
    rng = np.random.RandomState(0)
    jacobian = rng.normal(size=(3, 5))
    pcgrad = aggregation.PCGrad(seed=7)
    pcgrad.build(3)
    got = _aggregate(pcgrad, jacobian)
    # Replay the orders the draw used.
    seed = tf.stack([tf.constant(7), tf.constant(0)])
    total = np.zeros(5)
    for i in range(3):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(3), tf.random.experimental.stateless_fold_in(seed, i)).numpy()
        g = jacobian[i].copy()
        for j in order:
            if j != i and g @ jacobian[j] < 0:
                g -= (g @ jacobian[j]) / (jacobian[j] @ jacobian[j]) * jacobian[j]
        total += g
    np.testing.assert_allclose(got, total, rtol=1e-5)


def test_mgda_finds_the_min_norm_point_of_two_gradients():
    g1, g2 = np.array([1.0, 0.0]), np.array([0.2, 1.0])
    alpha = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)  # Sener & Koltun, alg. 1
    np.testing.assert_allclose(_aggregate(aggregation.MGDA(), [g1, g2]),
                               alpha * g1 + (1 - alpha) * g2, rtol=1e-5)
    # One gradient inside the other's half-plane: the min-norm point is a vertex.
    np.testing.assert_allclose(_aggregate(aggregation.MGDA(), [[1.0, 0.0], [3.0, 1.0]]),
                               [1.0, 0.0], rtol=1e-5)


def test_mgda_matches_a_search_over_the_simplex_for_three_tasks():
    jacobian = np.array([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.1], [0.2, 0.1, 1.0]])
    grid = [np.array([a, b, 1 - a - b]) for a, b in itertools.product(np.linspace(0, 1, 201),
                                                                       repeat=2) if a + b <= 1]
    best = min(np.linalg.norm(w @ jacobian) for w in grid)
    got = _aggregate(aggregation.MGDA(), jacobian)
    assert np.linalg.norm(got) <= best + 1e-3
    np.testing.assert_allclose(np.linalg.norm(got), best, atol=2e-3)


def _min_norm_by_faces(gramian):
    """The min-norm weights by enumeration: on each face S of the simplex the
    affine minimiser solves `[[G_SS, 1], [1^T, 0]] [v; -mu] = [0; 1]`; the
    optimum is the best of those with v >= 0."""
    tasks, best = len(gramian), (np.inf, None)
    for size in range(1, tasks + 1):
        for face in map(list, itertools.combinations(range(tasks), size)):
            kkt = np.block([[gramian[np.ix_(face, face)], np.ones((size, 1))],
                            [np.ones((1, size)), np.zeros((1, 1))]])
            if abs(np.linalg.det(kkt)) < 1e-12:
                continue  # affinely dependent: another face has its points
            v = np.linalg.solve(kkt, np.r_[np.zeros(size), 1.0])[:size]
            w = np.zeros(tasks)
            w[face] = v
            if v.min() >= -1e-12 and w @ gramian @ w < best[0]:
                best = (w @ gramian @ w, w)
    return best[1]


def test_mgda_is_the_exact_min_norm_point_also_on_a_face_of_the_simplex():
    # g_3 beyond the g_1-g_2 edge: the optimum is that edge's midpoint.
    jacobian = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    weights = aggregation.MGDA().task_coefficients(tf.constant(jacobian @ jacobian.T))
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.0], atol=1e-12)  # float64 in, exact
    # Random gradients, more tasks than dimensions and fewer (optima on faces
    # and inside), against the enumeration; Frank-Wolfe's 250 iterations
    # leave the norm up to 0.045 above it on these.
    rng = np.random.default_rng(0)
    for tasks, dims in [(3, 2), (5, 3), (6, 2), (4, 6), (6, 8)] * 4:
        jacobian = rng.normal(size=(tasks, dims)) + rng.normal(size=dims)
        gramian = jacobian @ jacobian.T
        weights = aggregation.MGDA().task_coefficients(tf.constant(gramian, tf.float32)).numpy()
        expected = _min_norm_by_faces(gramian)
        np.testing.assert_allclose(np.sqrt(weights @ gramian @ weights),
                                   np.sqrt(expected @ gramian @ expected), atol=1e-6)
        if tasks <= dims:  # a unique optimum
            np.testing.assert_allclose(weights, expected, atol=2e-5)


@pytest.mark.parametrize("jacobian", [[[1.0, 0.0], [-0.5, 1.0]], [[2.0, 0.3], [0.1, 1.0]],
                                      [[1.0, 0.0], [-1.0, 0.2]]])
def test_cagrad_maximises_the_worst_task_within_its_ball(jacobian):
    c = 0.5
    jacobian = np.array(jacobian)
    g0 = jacobian.mean(0)
    radius = c * np.linalg.norm(g0)
    d = _aggregate(aggregation.CAGrad(c=c), jacobian) * (1 + c ** 2)  # undo the rescale
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-4)  # the bound of eq. (4)
    # Eq. (4) by search over the ball's boundary (a linear objective's optimum).
    angles = np.linspace(0, 2 * np.pi, 20001)
    ball = g0 + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    best = (ball @ jacobian.T).min(1).max()
    np.testing.assert_allclose((jacobian @ d).min(), best, rtol=1e-4, atol=1e-6)


def test_cagrad_with_c_zero_is_the_average_gradient():
    jacobian = [[1.0, 0.0], [-0.5, 1.0]]
    np.testing.assert_allclose(_aggregate(aggregation.CAGrad(c=0.0), jacobian),
                               np.mean(jacobian, 0), rtol=1e-6)


def test_graddrop_keeps_one_sign_per_coordinate():
    jacobian = np.array([[1.0, -1.0, 2.0, 0.5], [1.0, 2.0, -2.0, 0.5], [3.0, -0.5, -1.0, 0.0]])
    for seed in range(20):
        out = _aggregate(aggregation.GradDrop(seed=seed), jacobian)
        np.testing.assert_allclose(out[[0, 3]], jacobian[:, [0, 3]].sum(0))  # purity 1
        for k in (1, 2):
            column = jacobian[:, k]
            assert out[k] in (column[column > 0].sum(), column[column < 0].sum())


def test_graddrop_keeps_the_positive_side_as_often_as_its_purity():
    jacobian = np.array([[3.0], [-1.0]])  # purity (1 + 2/4) / 2 = 0.75
    graddrop = aggregation.GradDrop(seed=1)
    kept = [_aggregate(graddrop, jacobian)[0] for _ in range(400)]
    assert set(kept) == {3.0, -1.0}
    assert abs(np.mean(np.array(kept) == 3.0) - 0.75) < 0.07


def test_imtl_g_projects_equally_onto_every_task_gradient():
    jacobian = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    coefficients = aggregation.IMTLG().task_coefficients(
        tf.constant(jacobian @ jacobian.T, tf.float32)).numpy()
    np.testing.assert_allclose(coefficients.sum(), 1.0, rtol=1e-5)
    g = coefficients @ jacobian
    projections = jacobian @ g / np.linalg.norm(jacobian, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_imtl_g_weighs_a_zero_gradient_zero_and_balances_the_others():
    # Task 3 has no rows in the batch: IMTL-G of tasks 1 and 2, G^-1 d = (1, 1/3).
    jacobian = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    coefficients = aggregation.IMTLG().task_coefficients(
        tf.constant(jacobian @ jacobian.T, tf.float32))
    np.testing.assert_allclose(coefficients, [0.75, 0.25, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(aggregation.IMTLG().task_coefficients(tf.zeros((2, 2))), 0)


def test_imtl_g_balances_a_gradient_far_smaller_than_the_others():
    # ||g_3||^2 = 1e-6 of the others' lies below the Gram matrix's float32
    # rounding (each benchmark run on FashionGroups stopped at epoch 12 on
    # it), not below the cosines': alpha_t ||g_t|| is equal, (1, 1, 1000) / 1002.
    jacobian = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1e-3]])
    coefficients = aggregation.IMTLG().task_coefficients(
        tf.constant(jacobian @ jacobian.T, tf.float32))
    np.testing.assert_allclose(coefficients, np.array([1.0, 1.0, 1000.0]) / 1002.0,
                               rtol=1e-5)


def test_imtl_g_refuses_more_tasks_than_dimensions():
    # In the plane, no g projects equally onto (1, 0), (0, 1) and (1, 1) / sqrt(2).
    jacobian = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="more tasks than dimensions"):
        aggregation.IMTLG().task_coefficients(tf.constant(jacobian @ jacobian.T, tf.float32))


def test_aggregators_by_name_and_unknown_names():
    assert isinstance(aggregation.get("pcgrad"), aggregation.PCGrad)
    with pytest.raises(ValueError, match="'pc'.*pcgrad"):
        aggregation.get("pc")
