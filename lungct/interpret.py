"""3D interpretability: gradient saliency, SmoothGrad and Grad-CAM, plus case picking.

All maps are computed in eval mode (BatchNorm running statistics, no dropout),
so every example's map depends on that example only. Inputs are the split model
used by training (`graphdef, params, batch_stats = nnx.split(model, nnx.Param,
nnx.BatchStat)`; pure dicts work too) and images (B, D, H, W, C) or (B, D, H, W).
The functions are pure and jit-able with the graphdef (and `layer`, `n`) closed
over, like the training steps (a GraphDef holding lists is not hashable, so it
cannot be a static argument):

    explain = jax.jit(lambda p, b, x: grad_cam(graphdef, p, b, x))

Outputs are float32 (B, D, H, W) maps normalised to [0, 1] per example (divided
by their maximum; an all-zero map stays zero).

    sal = saliency(graphdef, params, batch_stats, images)
    cam = grad_cam(graphdef, params, batch_stats, images)            # last conv block
    cam = grad_cam(graphdef, params, batch_stats, images, layer="blocks.1")
    picks = explain_cases(pred["prob"], pred["label"], pred["study_id"])

The explained score is the single logit of a binary model, or for a multi-class
model the logit of `target` (an int or a (B,) int array; default: the predicted
class). Grad-CAM reads the activations of any submodule of the model, named by
its attribute path ("blocks.2", "blocks.-1", "stem_bn"), by temporarily wrapping
that submodule in the freshly merged model, so the models need no extra methods.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

CATEGORIES = ("true_positive", "false_positive", "false_negative", "true_negative")


# ----------------------------------------------------------------------------- helpers

def _as_5d(images: jax.Array) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim == 4:
    return images[..., None]
  if images.ndim != 5:
    raise ValueError(f"images must be (B, D, H, W, C) or (B, D, H, W); got shape {images.shape}")
  return images


def normalize(maps: jax.Array) -> jax.Array:
  """Non-negative maps (B, ...) divided by their per-example maximum; all-zero maps stay 0."""
  maps = jnp.maximum(maps.astype(jnp.float32), 0.0)
  peak = jnp.max(maps.reshape(maps.shape[0], -1), axis=1)
  peak = peak.reshape((-1,) + (1,) * (maps.ndim - 1))
  return jnp.where(peak > 0, maps / jnp.where(peak > 0, peak, 1.0), 0.0)


def select_logit(logits: jax.Array, target: Any = None) -> jax.Array:
  """(B,) explained score: the binary logit, or the `target` / predicted class logit."""
  if logits.shape[-1] == 1:
    return logits[:, 0]
  if target is None:
    target = jnp.argmax(logits, axis=-1)
  target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), logits.shape[:1])
  return jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]


def _eval_model(graphdef: nnx.GraphDef, params: Any, batch_stats: Any) -> nnx.Module:
  return nnx.merge(graphdef, params, batch_stats)


def _input_gradient(graphdef, params, batch_stats, images, target) -> jax.Array:
  """d(score_b)/d(images_b) for every example b: (B, D, H, W, C).

  Summing the per-example scores is exact because eval mode makes examples independent.
  """
  def total_score(x):
    logits = _eval_model(graphdef, params, batch_stats)(x, train=False)
    return jnp.sum(select_logit(logits, target))
  return jax.grad(total_score)(images)


# ----------------------------------------------------------------------------- saliency

def saliency(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, images: jax.Array, *,
             target: Any = None) -> jax.Array:
  """Vanilla gradient saliency |d score / d input|, max over channels, in [0, 1]: (B, D, H, W)."""
  images = _as_5d(images)
  grad = _input_gradient(graphdef, params, batch_stats, images, target)
  return normalize(jnp.max(jnp.abs(grad), axis=-1))


def smoothgrad(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, images: jax.Array,
               key: jax.Array, *, n: int = 8, sigma: float = 0.1,
               target: Any = None) -> jax.Array:
  """SmoothGrad: mean |gradient| over `n` noisy copies, max over channels, in [0, 1].

  The noise std is `sigma` times each example's intensity range (max - min), as in
  Smilkov et al. 2017. The target class (multi-class, `target=None`) is the one
  predicted on the clean images, so every copy explains the same class.
  """
  images = _as_5d(images)
  if target is None:
    logits = _eval_model(graphdef, params, batch_stats)(images, train=False)
    target = None if logits.shape[-1] == 1 else jnp.argmax(logits, axis=-1)
  axes = tuple(range(1, images.ndim))
  scale = sigma * (jnp.max(images, axis=axes, keepdims=True) - jnp.min(images, axis=axes, keepdims=True))

  def body(total, k):  # sequential, so memory stays that of one gradient
    noisy = images + scale * jax.random.normal(k, images.shape, images.dtype)
    return total + jnp.abs(_input_gradient(graphdef, params, batch_stats, noisy, target)), None

  total, _ = jax.lax.scan(body, jnp.zeros_like(images), jax.random.split(key, n))
  return normalize(jnp.max(total / n, axis=-1))


# ----------------------------------------------------------------------------- Grad-CAM

class _Probe(nnx.Module):
  """Wraps a submodule: its output y becomes `hook(y)` (used to read and perturb it)."""

  def __init__(self, inner: Callable[..., jax.Array], hook: Callable[[jax.Array], jax.Array]):
    self.inner = inner
    self.hook = hook

  def __call__(self, *args, **kwargs) -> jax.Array:
    return self.hook(self.inner(*args, **kwargs))


def _parse_layer(layer: str | Sequence[str | int]) -> tuple[str | int, ...]:
  parts = layer.replace("/", ".").split(".") if isinstance(layer, str) else list(layer)
  return tuple(int(p) if isinstance(p, int) or p.lstrip("-").isdigit() else p for p in parts)


def _install_probe(model: nnx.Module, path: tuple[str | int, ...],
                   hook: Callable[[jax.Array], jax.Array]) -> None:
  """Replaces the submodule at `path` in `model` (in place) by a `_Probe` around it."""
  parent: Any = model
  for i, part in enumerate(path):
    try:
      child = parent[part] if isinstance(part, int) else getattr(parent, part)
    except (AttributeError, IndexError, TypeError) as e:
      raise ValueError(f"grad_cam layer {'.'.join(map(str, path))!r}: no submodule "
                       f"{'.'.join(map(str, path[:i + 1]))!r} in {type(model).__name__}") from e
    if i == len(path) - 1:
      if not callable(child):
        raise ValueError(f"grad_cam layer {'.'.join(map(str, path))!r} is not callable")
      probe = _Probe(child, hook)
      if isinstance(part, int):
        parent[part % len(parent)] = probe
      else:
        setattr(parent, part, probe)
    parent = child


def layer_output_shape(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, images: Any,
                       layer: str | Sequence[str | int]) -> jax.ShapeDtypeStruct:
  """Shape of `layer`'s output for `images` (an array or ShapeDtypeStruct); tracing only."""
  path = _parse_layer(layer)
  def forward(x):
    seen = []
    model = _eval_model(graphdef, params, batch_stats)
    _install_probe(model, path, lambda y: seen.append(y) or y)
    model(x, train=False)
    if not seen:
      raise ValueError(f"grad_cam layer {'.'.join(map(str, path))!r} is never called by the model")
    return seen[-1]
  return jax.eval_shape(forward, images)


def default_layer(graphdef: nnx.GraphDef, params: Any, batch_stats: Any,
                  images: jax.Array) -> tuple[str | int, ...]:
  """The last entry of `model.blocks` whose output keeps more than one voxel.

  (The tutorial CNN with VALID padding shrinks a 48^3 input to 1^3 in its last
  block; a one-voxel map carries no location, so the block before it is used.)
  """
  model = _eval_model(graphdef, params, batch_stats)
  blocks = getattr(model, "blocks", None)
  if blocks is None or len(blocks) == 0:
    raise ValueError(f"{type(model).__name__} has no `blocks`: pass grad_cam(layer=...)")
  images = _as_5d(images)
  for i in reversed(range(len(blocks))):
    shape = layer_output_shape(graphdef, params, batch_stats, images, ("blocks", i)).shape
    if len(shape) == 5 and int(np.prod(shape[1:4])) > 1:
      return ("blocks", i)
  return ("blocks", len(blocks) - 1)


def grad_cam(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, images: jax.Array, *,
             layer: str | tuple | None = None, target: Any = None) -> jax.Array:
  """3D Grad-CAM (Selvaraju et al. 2017) upsampled to the input: (B, D, H, W) in [0, 1].

  A = the (B, d, h, w, K) output of `layer` (default: `default_layer`), weights
  w_k = spatial mean of d score / d A_k, cam = relu(sum_k w_k A_k), resized
  trilinearly to (D, H, W) with the feature voxels placed at their receptive-field
  centres (`upsample`), and divided by its per-example maximum.
  """
  images = _as_5d(images)
  path = default_layer(graphdef, params, batch_stats, images) if layer is None else _parse_layer(layer)
  act_shape = layer_output_shape(graphdef, params, batch_stats, images, path)
  if len(act_shape.shape) != 5:
    raise ValueError(f"grad_cam layer {'.'.join(map(str, path))!r} outputs shape {act_shape.shape}, "
                     "not a (B, d, h, w, K) feature map")

  def score(delta):
    seen = []
    def hook(y):
      seen.append(y)
      return y + delta.astype(y.dtype)
    model = _eval_model(graphdef, params, batch_stats)
    _install_probe(model, path, hook)
    logits = model(images, train=False)
    return jnp.sum(select_logit(logits, target)), seen[-1]

  zeros = jnp.zeros(act_shape.shape, jnp.float32)
  grads, acts = jax.grad(score, has_aux=True)(zeros)  # d score / d A, A
  weights = jnp.mean(grads, axis=(1, 2, 3), keepdims=True)  # (B, 1, 1, 1, K)
  cam = jax.nn.relu(jnp.sum(weights * acts.astype(jnp.float32), axis=-1))  # (B, d, h, w)
  strides = layer_strides(graphdef, params, batch_stats, images, path)
  return normalize(upsample(cam, images.shape[1:4], strides))


def layer_strides(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, images: Any,
                  layer: str | Sequence[str | int]) -> tuple[int, ...]:
  """Input voxels per feature-map voxel along D, H, W (exact for conv/pool stacks).

  Growing the input by 64 voxels grows a map of total stride s (a power of two
  up to 64) by exactly 64 / s, whatever the padding; shapes only, no compute.
  """
  grown = jax.ShapeDtypeStruct(
      (images.shape[0], *(n + 64 for n in images.shape[1:4]), images.shape[4]), images.dtype)
  shape = layer_output_shape(graphdef, params, batch_stats, images, layer).shape
  bigger = layer_output_shape(graphdef, params, batch_stats, grown, layer).shape
  return tuple(64 // max(b - a, 1) for a, b in zip(shape[1:4], bigger[1:4]))


def upsample(cam: jax.Array, size: Sequence[int], strides: Sequence[int] | None = None) -> jax.Array:
  """Trilinear upsampling of (B, d, h, w) maps to (B, *size), aligned to the receptive fields.

  Feature voxel l of a map with stride s sits at input voxel (N - 1) / 2 + s (l - (n - 1) / 2),
  i.e. the map covers an s * n box centred in the input (a VALID-padded CNN covers less than
  the whole volume); values beyond the first and last centres are held constant. With
  `strides=None` (s = N / n) this is `jax.image.resize(cam, ..., "trilinear")`.
  """
  strides = strides or [n_out / n_in for n_in, n_out in zip(cam.shape[1:], size)]
  mats = []
  for n_in, n_out, s in zip(cam.shape[1:], size, strides):
    u = (jnp.arange(n_out) - (n_out - 1) / 2) / s + (n_in - 1) / 2  # position in feature voxels
    u = jnp.clip(u, 0, n_in - 1)
    mats.append(jnp.maximum(0.0, 1.0 - jnp.abs(u[:, None] - jnp.arange(n_in)[None, :])))
  return jnp.einsum("bdhw,Dd,Hh,Ww->bDHW", cam, *mats)


# ----------------------------------------------------------------------------- case picking

def explain_cases(prob: np.ndarray, label: np.ndarray, study_id: Sequence[Any] | None = None, *,
                  threshold: float = 0.5, per_category: int = 1) -> dict[str, np.ndarray]:
  """Indices of the most confident true/false positives/negatives, `per_category` each.

  `prob` is P(abnormal) (N,), or (N, K) class probabilities, in which case
  P(abnormal) = 1 - prob[:, 0] and labels are binarised as label > 0. Positives
  are prob >= threshold. True/false positives are ordered by decreasing prob,
  true/false negatives by increasing prob; ties break by study id (else index).
  Returns {category: int64 indices}, empty where a category has no case.
  """
  prob = np.asarray(prob, np.float64)
  label = np.asarray(label)
  if prob.ndim == 2:
    prob = 1.0 - prob[:, 0]
  if prob.ndim != 1 or label.shape != prob.shape:
    raise ValueError(f"explain_cases: prob {prob.shape} and label {label.shape} must both be (N,)")
  truth = label > 0
  pred = prob >= threshold
  from lungct.data import pipeline
  tie = np.arange(len(prob)) if study_id is None else np.array([pipeline.to_str(s) for s in study_id])
  if len(tie) != len(prob):
    raise ValueError(f"explain_cases: {len(tie)} study ids for {len(prob)} predictions")
  out = {}
  for name, member, confidence in (
      ("true_positive", truth & pred, prob), ("false_positive", ~truth & pred, prob),
      ("false_negative", truth & ~pred, -prob), ("true_negative", ~truth & ~pred, -prob)):
    idx = np.flatnonzero(member)
    order = np.lexsort((tie[idx], -confidence[idx]))  # last key is primary
    out[name] = idx[order][:per_category].astype(np.int64)
  return out
