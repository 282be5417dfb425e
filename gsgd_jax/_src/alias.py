"""G-SGD and path-space versions of common optax optimizers: ``path_space(optax.X(...))``.

Each runs its optax namesake on basis-path gradients (docs/math.md), so the trained
network's function does not depend on how the initial weights are positively
rescaled per hidden node. Parameters outside ``layers`` get the same optax
optimizer on their ordinary gradients unless ``fallback`` says otherwise.
"""

from __future__ import annotations

import optax

from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.transform import DEFAULT_RATIO_CLIP, path_space


def gsgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  layers: LayerPaths,
  momentum: float | None = None,
  nesterov: bool = False,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
  implicit_decay: bool = False,
  initial_rate_norm: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""G-SGD: stochastic gradient descent on the basis-path values of a ReLU net.

  Plain G-SGD (Meng et al., 2019) takes, for every basis path :math:`p`,

  .. math::
    v_p \leftarrow v_p - \eta_t \, \frac{\partial L}{\partial v_p},

  computed from ordinary weight gradients by the inverse chain rule and turned
  back into weights by weight allocation. It equals
  ``path_space(optax.sgd(learning_rate, momentum, nesterov), layers=layers)``;
  parameters outside ``layers`` get plain SGD with the same settings.
  Outputs of the trained network do not depend on how the initial weights are
  positively rescaled per hidden node, unlike plain SGD.

  Use :func:`gsgd_jax.set_skeleton` on the initial params first, as the authors
  did: with skeleton weights 1, path values start at the scale of single
  weights.

  Args:
    learning_rate: a float or an optax schedule (a function of the step count).
    layers: ordered key paths of the layers (see :func:`path_space`).
    momentum: optional momentum (heavy ball) in path space.
    nesterov: use Nesterov momentum.
    fallback: the transformation for parameters outside ``layers``; by default
      the same SGD on their ordinary gradients (see :func:`path_space`).
    ratio_clip: bounds of the skeleton path ratios (see :func:`path_space`).
    renormalize: keep the output norms of blocks declared ``normalized=True``
      from growing (see :func:`path_space`).
    clip_norm: clip the gradients by their global norm, measured invariantly
      (see :func:`path_space`).
    implicit_decay: give normalized blocks SGD's learning-rate decay from the
      growth of weights before a BatchNorm, invariantly; for large learning
      rates in deep BatchNorm nets (see :func:`path_space`).
    initial_rate_norm: where the implicit decay's rate norms start (see
      :func:`path_space`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> layers = gsgd_jax.infer_layers(params)
    >>> params = gsgd_jax.set_skeleton(params, layers)
    >>> tx = gsgd_jax.gsgd(0.1, layers=layers)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.mean(model.apply(p, jnp.ones((4, 8))) ** 2)
    >>> print(round(float(loss(params)), 4))
    45.7411
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(round(float(loss(params)), 4))
    7.7812

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    layers=layers,
    fallback=fallback,
    ratio_clip=ratio_clip,
    renormalize=renormalize,
    clip_norm=clip_norm,
    implicit_decay=implicit_decay,
    initial_rate_norm=initial_rate_norm,
  )


def g_momentum(
  learning_rate: optax.ScalarOrSchedule,
  momentum: float = 0.9,
  *,
  layers: LayerPaths,
  nesterov: bool = False,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
  implicit_decay: bool = False,
  initial_rate_norm: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""G-SGD with heavy-ball (or Nesterov) momentum on the basis-path values.

  .. math::
    m_t = \mu m_{t-1} + \partial L / \partial v, \qquad
    \Delta v = -\eta_t m_t \;\; (\text{Nesterov: } -\eta_t(\mu m_t + \partial L/\partial v))

  Args:
    learning_rate: a float or an optax schedule.
    momentum: the decay :math:`\mu` of the momentum.
    layers: the layers' key paths (see :func:`gsgd_jax.path_space`).
    nesterov: use Nesterov momentum.
    fallback: transformation for parameters outside ``layers``.
    ratio_clip: bounds of the skeleton path ratios.
    renormalize: keep the output norms of normalized blocks from growing.
    clip_norm: clip the gradients by their invariant global norm.
    implicit_decay: give normalized blocks SGD's learning-rate decay from the
      growth of weights before a BatchNorm (see :func:`gsgd_jax.path_space`).
    initial_rate_norm: where the implicit decay's rate norms start.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> x = jax.random.normal(jax.random.key(1), (8, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> layers = gsgd_jax.infer_layers(params)
    >>> params = gsgd_jax.set_skeleton(params, layers)
    >>> # The same function, every hidden unit rescaled:
    >>> rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(2))
    >>> loss = lambda p: jnp.mean((model.apply(p, x) - 1.0) ** 2)
    >>> def train(tx, p, steps=5):
    ...   step = jax.jit(lambda p, state: tx.update(jax.grad(loss)(p), state, p))
    ...   state = tx.init(p)
    ...   for _ in range(steps):
    ...     updates, state = step(p, state)
    ...     p = optax.apply_updates(p, updates)
    ...   return p
    >>> def gap(tx):  # largest output difference after training from the two starts
    ...   return float(jnp.abs(model.apply(train(tx, params), x)
    ...                        - model.apply(train(tx, rescaled), x)).max())
    >>> print(gap(gsgd_jax.g_momentum(0.01, 0.9, layers=layers)) < 1e-4,
    ...       gap(optax.sgd(0.01, 0.9)) < 1e-4)
    True False

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    layers=layers,
    fallback=fallback,
    ratio_clip=ratio_clip,
    renormalize=renormalize,
    clip_norm=clip_norm,
    implicit_decay=implicit_decay,
    initial_rate_norm=initial_rate_norm,
  )


def g_adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  layers: LayerPaths,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on the basis-path values.

  With :math:`g = \partial L / \partial v`:

  .. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g, \quad
    s_t = \beta_2 s_{t-1} + (1 - \beta_2) g^2, \quad
    \Delta v = -\eta_t \, \hat m_t / (\sqrt{\hat s_t} + \epsilon)

  with bias-corrected :math:`\hat m_t, \hat s_t`. The second moments are taken
  per basis path, so they are invariant under rescaling (Adam on weights is not).

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    layers: the layers' key paths (see :func:`gsgd_jax.path_space`).
    fallback: transformation for parameters outside ``layers``.
    ratio_clip: bounds of the skeleton path ratios.
    renormalize: keep the output norms of normalized blocks from growing.
    clip_norm: clip the gradients by their invariant global norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))}, 'l1': {'kernel': jnp.ones((4, 2))}}
    >>> layers = ['l0', 'l1']
    >>> tx = gsgd_jax.g_adam(1e-3, layers=layers)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> v, new_v = (gsgd_jax.basis_path_values(p, layers) for p in (params, new_params))
    >>> # Adam's first step moves every path value by lr:
    >>> print(jnp.abs(new_v['l1']['kernel'] - v['l1']['kernel']).round(6).T)
    [[0.001 0.001 0.001 0.001]
     [0.001 0.001 0.001 0.001]]

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    layers=layers,
    fallback=fallback,
    ratio_clip=ratio_clip,
    renormalize=renormalize,
    clip_norm=clip_norm,
  )


def g_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  *,
  layers: LayerPaths,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with decoupled weight decay of the basis-path values.

  .. math::
    \Delta v = -\eta_t \big(\hat m_t / (\sqrt{\hat s_t} + \epsilon) + \lambda v\big)

  Weight decay in path space is decay of path values: with ``inner`` seeing the
  basis-path values as its params, optax's decoupled decay shrinks every basis
  path by :math:`1 - \eta_t \lambda` per step. Unlike decay of weights, this is
  invariant under rescaling of hidden nodes, and it leaves the fixed skeleton
  weights alone (their basis values are 0). Parameters outside ``layers`` get
  ordinary AdamW by default.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    weight_decay: the decay rate :math:`\lambda` of path values.
    layers: the layers' key paths (see :func:`gsgd_jax.path_space`).
    fallback: transformation for parameters outside ``layers``.
    ratio_clip: bounds of the skeleton path ratios.
    renormalize: keep the output norms of normalized blocks from growing.
    clip_norm: clip the gradients by their invariant global norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))}, 'l1': {'kernel': jnp.ones((4, 2))}}
    >>> layers = ['l0', 'l1']
    >>> tx = gsgd_jax.g_adamw(0.1, weight_decay=0.5, layers=layers)
    >>> grads = jax.tree.map(jnp.zeros_like, params)  # decay alone
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> v, new_v = (gsgd_jax.basis_path_values(p, layers) for p in (params, new_params))
    >>> print((new_v['l1']['kernel'] / v['l1']['kernel']).round(6).T)  # 1 - 0.1 * 0.5
    [[0.95 0.95 0.95 0.95]
     [0.95 0.95 0.95 0.95]]

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(
    optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    layers=layers,
    fallback=fallback,
    ratio_clip=ratio_clip,
    renormalize=renormalize,
    clip_norm=clip_norm,
  )


def g_rmsprop(
  learning_rate: optax.ScalarOrSchedule,
  decay: float = 0.9,
  eps: float = 1e-8,
  momentum: float | None = None,
  nesterov: bool = False,
  *,
  layers: LayerPaths,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSProp on the basis-path values.

  .. math::
    s_t = \rho s_{t-1} + (1 - \rho) g^2, \qquad
    \Delta v = -\eta_t \, g / (\sqrt{s_t} + \epsilon)

  with :math:`g = \partial L / \partial v` (and optional momentum on the result).

  Args:
    learning_rate: a float or an optax schedule.
    decay: the decay :math:`\rho` of the squared-gradient average.
    eps: added to the denominator.
    momentum: optional momentum.
    nesterov: use Nesterov momentum.
    layers: the layers' key paths (see :func:`gsgd_jax.path_space`).
    fallback: transformation for parameters outside ``layers``.
    ratio_clip: bounds of the skeleton path ratios.
    renormalize: keep the output norms of normalized blocks from growing.
    clip_norm: clip the gradients by their invariant global norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))}, 'l1': {'kernel': jnp.ones((4, 2))}}
    >>> layers = ['l0', 'l1']
    >>> tx = gsgd_jax.g_rmsprop(1e-3, layers=layers)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> v, new_v = (gsgd_jax.basis_path_values(p, layers) for p in (params, new_params))
    >>> step = jnp.abs(new_v['l1']['kernel'] - v['l1']['kernel'])
    >>> print(round(float(step.min()) / 1e-3, 2), round(float(step.max()) / 1e-3, 2))
    3.16 3.16

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(
    optax.rmsprop(learning_rate, decay=decay, eps=eps, momentum=momentum, nesterov=nesterov),
    layers=layers,
    fallback=fallback,
    ratio_clip=ratio_clip,
    renormalize=renormalize,
    clip_norm=clip_norm,
  )
