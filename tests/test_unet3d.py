"""Tests of the 3D U-Net (tversky_jax/models/unet3d.py) on 16^3 volumes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from tests import helpers
from tversky_jax.models import UNet3D, count_params, required_divisor
from tversky_jax.models import unet3d

SIZE = 16


def _rngs(seed=0):
  # Threefry initialisers compile once per parameter shape (about a second
  # each on XLA:CPU, tens of seconds per model); "rbg" keys compile in a
  # fraction of that. The model does not depend on the key implementation.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _input(batch=1, channels=3, size=(SIZE, SIZE, SIZE), seed=0):
  return helpers.normal(seed, (batch, *size, channels))


def _max_rel_diff(a, b):
  diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
  scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(b))
  return max(float(d) for d in jax.tree.leaves(diffs)) / scale


@pytest.mark.parametrize(
    "depth, base_features, normalization, dtype, num_classes",
    [
        (0, 4, "none", jnp.float32, 2),
        (2, 6, "none", jnp.bfloat16, 3),
        (3, 4, "instance", jnp.float32, 2),
        (4, 2, "batch", jnp.float32, 2),
    ],
)
def test_output_shape_and_dtypes(depth, base_features, normalization, dtype,
                                 num_classes):
  model = UNet3D(in_channels=3, num_classes=num_classes,
                 base_features=base_features, depth=depth,
                 normalization=normalization, dtype=dtype, rngs=_rngs())
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, _input())
  assert logits.shape == (1, SIZE, SIZE, SIZE, num_classes)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Not a constant map: the network sees the input.
  assert float(jnp.std(logits[..., 0])) > 0
  # Parameters (and batch statistics) stay float32 whatever the compute dtype.
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {
      jnp.dtype(jnp.float32)}


def test_features_double_per_level_and_param_count():
  base, depth, cin, ncls = 4, 3, 2, 2
  model = UNet3D(in_channels=cin, num_classes=ncls, base_features=base,
                 depth=depth, rngs=_rngs())
  feats = [base * 2**level for level in range(depth + 1)]
  assert len(model.encoder) == depth and len(model.decoder) == depth
  for level, block in enumerate(model.encoder):
    fin = cin if level == 0 else feats[level - 1]
    assert block.conv1.kernel.shape == (3, 3, 3, fin, feats[level])
    assert block.conv2.kernel.shape == (3, 3, 3, feats[level], feats[level])
  assert model.bottleneck.conv1.kernel.shape == (3, 3, 3, feats[-2], feats[-1])
  # Decoder runs coarse to fine; the up-conv halves the features and the
  # first conv reads [upsampled, skip] = 2f channels.
  for block, level in zip(model.decoder, reversed(range(depth))):
    f = feats[level]
    assert block.up.kernel.shape == (2, 2, 2, 2 * f, f)
    assert block.block.conv1.kernel.shape == (3, 3, 3, 2 * f, f)
    assert block.block.conv2.kernel.shape == (3, 3, 3, f, f)
  assert model.head.kernel.shape == (1, 1, 1, base, ncls)

  def conv(fin, fout, k=27):
    return k * fin * fout + fout

  expected = sum(conv(cin if l == 0 else feats[l - 1], feats[l])
                 + conv(feats[l], feats[l]) for l in range(depth + 1))
  expected += sum(conv(2 * feats[l], feats[l], 8) + conv(2 * feats[l], feats[l])
                  + conv(feats[l], feats[l]) for l in range(depth))
  expected += conv(base, ncls, 1)
  assert count_params(model) == expected


def test_count_params_excludes_batch_stats():
  plain = UNet3D(in_channels=1, depth=1, base_features=4, rngs=_rngs())
  batch = UNet3D(in_channels=1, depth=1, base_features=4,
                 normalization="batch", rngs=_rngs())
  # 3x3x3 conv outputs: encoder 4 + 4, bottleneck 8 + 8, decoder 4 + 4.
  conv_biases = 32
  # A normalized conv drops its bias; each norm has a scale and a bias.
  assert count_params(batch) == count_params(plain) - conv_biases + 2 * conv_biases
  n_stats = sum(x.size for x in jax.tree.leaves(nnx.state(batch, nnx.BatchStat)))
  assert n_stats == 2 * conv_biases


def test_skip_connections_carry_information():
  model = UNet3D(in_channels=3, depth=2, base_features=4, rngs=_rngs())
  x = _input()
  ref = model(x)

  # Ignoring the skip half of the finest decoder conv changes the output.
  conv = model.decoder[-1].block.conv1
  f = model.base_features
  saved = conv.kernel[...]
  conv.kernel[...] = saved.at[:, :, :, f:, :].set(0.0)
  assert float(jnp.max(jnp.abs(model(x) - ref))) > 1e-3
  conv.kernel[...] = saved

  # With every up-conv zeroed only the skips connect input and output: the
  # logits still vary over the volume and react to the contracting path.
  for block in model.decoder:
    block.up.kernel[...] = jnp.zeros_like(block.up.kernel[...])
    block.up.bias[...] = jnp.zeros_like(block.up.bias[...])
  cut = model(x)
  assert float(jnp.std(cut[..., 0])) > 1e-4
  model.encoder[0].conv1.kernel[...] = model.encoder[0].conv1.kernel[...] * 1.5
  assert float(jnp.max(jnp.abs(model(x) - cut))) > 1e-4
  # ... and the coarse path is really cut off.
  before = model(x)
  model.bottleneck.conv1.kernel[...] = -model.bottleneck.conv1.kernel[...]
  np.testing.assert_array_equal(model(x), before)


def test_required_divisor():
  assert [required_divisor(d) for d in range(5)] == [1, 2, 4, 8, 16]
  with pytest.raises(ValueError):
    required_divisor(-1)


def _abstract_model(**kwargs):
  """A model of ShapeDtypeStructs: enough for shape checks, nothing compiled."""
  return nnx.eval_shape(lambda: UNet3D(rngs=_rngs(), **kwargs))


def _traced_forward(model, x):
  """Traces ``model(x)`` under ``jax.jit`` (shapes only) the trainer's way."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return forward.trace(state, x).out_info


def test_nondivisible_spatial_size_raises():
  model = _abstract_model(in_channels=3, depth=3, base_features=4)
  x = jax.ShapeDtypeStruct((1, 16, 16, 12, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"\(16, 16, 12\).*not divisible by 8"):
    model(x)
  with pytest.raises(ValueError, match=r"\(16, 16, 12\).*not divisible by 8"):
    _traced_forward(model, x)
  # depth 2 only needs multiples of 4.
  out = _traced_forward(
      _abstract_model(in_channels=3, depth=2, base_features=4), x)
  assert out.shape == (1, 16, 16, 12, 2) and out.dtype == jnp.float32


def test_wrong_channels_or_rank_raises():
  model = _abstract_model(in_channels=3, depth=1, base_features=4)
  with pytest.raises(ValueError, match="in_channels=3.*has 4 channels"):
    _traced_forward(model, jax.ShapeDtypeStruct((1, 8, 8, 8, 4), jnp.float32))
  with pytest.raises(ValueError, match="5-D input"):
    model(jnp.zeros((SIZE, SIZE, SIZE, 3)))


def test_unknown_options_raise():
  with pytest.raises(ValueError, match=r"'layer'.*'none', 'group', 'instance', 'batch'"):
    UNet3D(in_channels=1, normalization="layer", rngs=_rngs())
  with pytest.raises(ValueError, match=r"'fft'.*'native', '2d_sum'"):
    UNet3D(in_channels=1, conv_impl="fft", rngs=_rngs())
  with pytest.raises(ValueError, match="base_features"):
    UNet3D(in_channels=1, base_features=0, rngs=_rngs())


def test_jit_with_split_merge_and_finite_gradients():
  model = UNet3D(in_channels=3, depth=1, base_features=4, rngs=_rngs())
  x = _input(batch=2)
  eager = model(x)
  # The trainer's pattern: split once, merge inside the jitted function.
  graphdef, state = nnx.split(model)
  params, rest = nnx.split_state(state, nnx.Param, ...)

  @jax.jit
  def loss_and_grad(params, x):
    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(x)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, logits), grads = loss_and_grad(params, x)
  np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  for g in leaves:
    assert g.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(g)))
  # Every layer gets a learning signal (no dead path).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_batch_norm_train_and_eval_modes():
  model = UNet3D(in_channels=3, depth=1, base_features=4,
                 normalization="batch", rngs=_rngs())
  x = 3.0 + 2.0 * _input(batch=2)
  stats0 = nnx.state(model, nnx.BatchStat)
  graphdef, state = nnx.split(model)

  @jax.jit
  def train_forward(state, x):
    model = nnx.merge(graphdef, state)
    logits = model(x)
    return logits, nnx.state(model)

  train_logits, new_state = train_forward(state, x)
  model_after = nnx.merge(graphdef, new_state)
  stats1 = nnx.state(model_after, nnx.BatchStat)
  assert _max_rel_diff(stats1, stats0) > 0  # running averages updated

  model_after.eval()
  eval_logits = model_after(x)
  assert nnx.state(model_after, nnx.BatchStat) == stats1  # frozen in eval
  assert float(jnp.max(jnp.abs(eval_logits - train_logits))) > 1e-3
  model_after.train()
  np.testing.assert_allclose(model_after(x), train_logits, rtol=1e-4, atol=1e-5)


def test_max_pool_matches_reduce_window():
  x = _input(batch=2, channels=5, size=(8, 6, 4))
  np.testing.assert_array_equal(unet3d._max_pool(x, (2, 2, 2)),
                                nnx.max_pool(x, (2, 2, 2), (2, 2, 2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upconv_matches_conv_transpose(dtype):
  up = unet3d.UpConv(6, 3, dtype=dtype, rngs=_rngs())
  ref = nnx.ConvTranspose(6, 3, kernel_size=(2, 2, 2), strides=(2, 2, 2),
                          padding="SAME", dtype=dtype, rngs=_rngs())
  # Same initialisation, same parameter layout.
  np.testing.assert_array_equal(up.kernel[...], ref.kernel[...])
  bias = jnp.linspace(-1.0, 1.0, 3)
  up.bias[...] = bias
  ref.bias[...] = bias
  x = _input(batch=2, channels=6, size=(3, 4, 2))
  out = up(x)
  assert out.shape == (2, 6, 8, 4, 3) and out.dtype == dtype
  np.testing.assert_allclose(out.astype(jnp.float32),
                             ref(x).astype(jnp.float32), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize(
    "padding", ["SAME", "VALID", ((1, 1), (0, 2), (2, 0))])
def test_conv3d_as_2d_sum_matches_lax(padding):
  x = _input(batch=2, channels=4, size=(5, 6, 7))
  k = helpers.normal(1, (3, 3, 3, 4, 6))
  dn = ("NDHWC", "DHWIO", "NDHWC")
  ref = lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=dn)
  out = unet3d.conv3d_as_2d_sum(x, k, (1, 1, 1), padding, dimension_numbers=dn)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  # Strided convolutions fall back to lax.
  ref = lax.conv_general_dilated(x, k, (2, 2, 2), padding, dimension_numbers=dn)
  out = unet3d.conv3d_as_2d_sum(x, k, (2, 2, 2), padding, dimension_numbers=dn)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_pointwise_conv_matches_lax_values_and_gradients():
  # The logits head: a 1x1x1 convolution as one matrix product.
  x, k, g, k3 = (helpers.normal(seed, shape) for seed, shape in enumerate(
      [(2, 5, 6, 7, 4), (1, 1, 1, 4, 3), (2, 5, 6, 7, 3), (3, 3, 3, 4, 3)]))
  dn = ("NDHWC", "DHWIO", "NDHWC")
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1, 1), "SAME",
                                              dimension_numbers=dn)
  ours = lambda x, k: unet3d.pointwise_conv(x, k, (1, 1, 1), "SAME",
                                            dimension_numbers=dn)
  out, vjp = jax.vjp(ours, x, k)
  ref_out, ref_vjp = jax.vjp(ref, x, k)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for ours_grad, ref_grad in zip(vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-5, atol=1e-4)
  # Forward mode works too (no custom VJP).
  jax.jvp(ours, (x, k), (x, k))
  # Other kernels and strides fall back to lax (a stride-1 3x3x3 kernel
  # would too; XLA:CPU takes seconds to compile its native convolution).
  for kernel in (k, k3):
    np.testing.assert_allclose(
        unet3d.pointwise_conv(x, kernel, (2, 2, 2), "SAME", dimension_numbers=dn),
        lax.conv_general_dilated(x, kernel, (2, 2, 2), "SAME", dimension_numbers=dn),
        rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16, 2), (3, 3, 3, 8, 8)])
def test_kernel_initializers_equal_flax_bit_for_bit(shape):
  # Drawn flat, at a power-of-two length (1024 and 2048 here), then cut and
  # reshaped: the values of Flax's variance-scaling initialisers, compiled
  # in a fraction of the time (Flax's own 5-D draws make this test slow).
  key = jax.random.key(3)
  pairs = [
      (unet3d.truncated_normal_fan_in(1.0), nnx.initializers.lecun_normal()),
      (unet3d.kernel_initializer("he"), nnx.initializers.variance_scaling(
          2.0, "fan_in", "truncated_normal")),
      (unet3d.upconv_kernel_initializer("he", "leaky_relu"),
       nnx.initializers.variance_scaling(
           2.0 / (1.0 + unet3d.LEAKY_RELU_SLOPE**2), "fan_in",
           "truncated_normal", batch_axis=(0, 1, 2)))]
  for ours, flax_init in pairs:
    value = ours(key, shape)
    assert value.shape == shape and value.dtype == jnp.float32
    np.testing.assert_array_equal(value, flax_init(key, shape))


def _same_state_layout(model_a, model_b):
  graphdef_a, state_a = nnx.split(model_a)
  graphdef_b, state_b = nnx.split(model_b)
  # Same state tree: a checkpoint of one restores into the other.
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  assert jax.tree.map(jnp.shape, state_a) == jax.tree.map(jnp.shape, state_b)
  return graphdef_a, graphdef_b, state_a


def test_2d_sum_equals_native_with_shared_params():
  kwargs = dict(in_channels=3, depth=1, base_features=4, normalization="batch")
  g_native, g_trick, state = _same_state_layout(
      UNet3D(conv_impl="native", rngs=_rngs(), **kwargs),
      UNet3D(conv_impl="2d_sum", rngs=_rngs(1), **kwargs))
  x = _input(batch=2)
  target = helpers.normal(5, (2, SIZE, SIZE, SIZE, 2))

  @jax.jit(static_argnums=0)
  def loss_and_grad(graphdef, state, x):
    def loss(model):  # the train step's pattern (BatchStat updates allowed)
      logits = model(x)
      return jnp.mean(logits * target), logits
    return nnx.value_and_grad(loss, has_aux=True)(nnx.merge(graphdef, state))

  (_, out_native), grad_native = loss_and_grad(g_native, state, x)
  (_, out_trick), grad_trick = loss_and_grad(g_trick, state, x)
  assert _max_rel_diff(out_trick, out_native) < 1e-5
  assert _max_rel_diff(grad_trick, grad_native) < 1e-5


def test_bfloat16_compute_matches_native_and_float32():
  kwargs = dict(in_channels=3, depth=1, base_features=4, normalization="group")
  g_native, g_trick, state = _same_state_layout(
      UNet3D(conv_impl="native", dtype=jnp.bfloat16, rngs=_rngs(), **kwargs),
      UNet3D(conv_impl="2d_sum", dtype=jnp.bfloat16, rngs=_rngs(1), **kwargs))
  # Params are float32 whatever the compute dtype: the same state runs in a
  # float32 model.
  g_f32, _, _ = _same_state_layout(
      UNet3D(rngs=_rngs(), **kwargs), UNet3D(rngs=_rngs(), **kwargs))
  forward = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)
  x = _input()
  ref = forward(g_f32, state, x)
  out_native = forward(g_native, state, x)
  out_trick = forward(g_trick, state, x)
  assert out_native.dtype == out_trick.dtype == jnp.float32
  assert not np.array_equal(out_native, ref)  # really computed in bf16
  assert _max_rel_diff(out_native, ref) < 5e-2
  # Forward only: bf16 rounding alone moves these gradients by ~15%
  # (native bf16 vs float32), too much for a meaningful comparison.
  assert _max_rel_diff(out_trick, out_native) < 5e-2


# --------------------------------------------------------------------------
# Per-stage strides, features per stage, init, activation, head bias
# --------------------------------------------------------------------------

# The state of UNet3D(in_channels=2, num_classes=3, base_features=2, depth=2)
# as listed from the code before strides / features_per_stage / init
# existed: "path type shape". A checkpoint of that code must still restore.
_OLD_TREE_NONE = """
bottleneck.conv1.bias Param 8
bottleneck.conv1.kernel Param 3,3,3,4,8
bottleneck.conv2.bias Param 8
bottleneck.conv2.kernel Param 3,3,3,8,8
decoder.0.block.conv1.bias Param 4
decoder.0.block.conv1.kernel Param 3,3,3,8,4
decoder.0.block.conv2.bias Param 4
decoder.0.block.conv2.kernel Param 3,3,3,4,4
decoder.0.up.bias Param 4
decoder.0.up.kernel Param 2,2,2,8,4
decoder.1.block.conv1.bias Param 2
decoder.1.block.conv1.kernel Param 3,3,3,4,2
decoder.1.block.conv2.bias Param 2
decoder.1.block.conv2.kernel Param 3,3,3,2,2
decoder.1.up.bias Param 2
decoder.1.up.kernel Param 2,2,2,4,2
encoder.0.conv1.bias Param 2
encoder.0.conv1.kernel Param 3,3,3,2,2
encoder.0.conv2.bias Param 2
encoder.0.conv2.kernel Param 3,3,3,2,2
encoder.1.conv1.bias Param 4
encoder.1.conv1.kernel Param 3,3,3,2,4
encoder.1.conv2.bias Param 4
encoder.1.conv2.kernel Param 3,3,3,4,4
head.bias Param 3
head.kernel Param 1,1,1,2,3
"""
# With normalization="batch" the same but without the 3x3x3 convolutions'
# biases, plus per norm layer ("path features") bias and scale (Param) and
# mean and var (BatchStat).
_OLD_BATCH_NORMS = """
bottleneck.norm1 8
bottleneck.norm2 8
decoder.0.block.norm1 4
decoder.0.block.norm2 4
decoder.1.block.norm1 2
decoder.1.block.norm2 2
encoder.0.norm1 2
encoder.0.norm2 2
encoder.1.norm1 4
encoder.1.norm2 4
"""


def _old_tree(normalization):
  rows = [line.split() for line in _OLD_TREE_NONE.strip().splitlines()]
  tree = {path: (kind, tuple(int(n) for n in shape.split(",")))
          for path, kind, shape in rows}
  if normalization == "batch":
    tree = {p: v for p, v in tree.items()
            if not (p.endswith(".bias") and ".conv" in p)}
    for line in _OLD_BATCH_NORMS.strip().splitlines():
      path, f = line.split()
      for name, kind in (("bias", "Param"), ("scale", "Param"),
                         ("mean", "BatchStat"), ("var", "BatchStat")):
        tree[f"{path}.{name}"] = (kind, (int(f),))
  return tree


def _tree(model):
  return {".".join(str(p) for p in path): (type(v).__name__, tuple(v.shape))
          for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("normalization", ["none", "batch"])
@pytest.mark.parametrize("extra", [
    {}, {"strides": [[2, 2, 2], [2, 2, 2]]}, {"features_per_stage": (2, 4, 8)},
    {"init": "he", "activation": "leaky_relu", "head_bias_init": (0., 1., 2.)}])
def test_parameter_tree_unchanged_by_default_strides(normalization, extra):
  kwargs = dict(in_channels=2, num_classes=3, normalization=normalization)
  if "features_per_stage" not in extra:
    kwargs["base_features"] = 2
  if "strides" not in extra:
    kwargs["depth"] = 2
  model = _abstract_model(**kwargs, **extra)
  assert _tree(model) == _old_tree(normalization)
  assert model.strides == ((2, 2, 2), (2, 2, 2))
  assert model.features_per_stage == (2, 4, 8) and model.depth == 2


def test_default_model_unchanged():
  model = _abstract_model(in_channels=3)
  assert model.depth == 4 and model.base_features == 16
  assert model.strides == unet3d.default_strides(4) == ((2, 2, 2),) * 4
  assert model.features_per_stage == (16, 32, 64, 128, 256)
  assert model.init == "lecun" and model.activation == "relu"


def test_required_divisors():
  assert unet3d.required_divisors([]) == (1, 1, 1)
  assert unet3d.required_divisors(unet3d.default_strides(3)) == (8, 8, 8)
  assert unet3d.required_divisors(
      [[2, 2, 1], [2, 2, 2], [2, 2, 1], [1, 2, 2]]) == (8, 16, 4)
  assert unet3d.required_divisors(np.array([[2, 1, 2]])) == (2, 1, 2)
  assert unet3d.default_strides(0) == ()
  with pytest.raises(ValueError, match="depth must be >= 0"):
    unet3d.default_strides(-1)


ANISO = ((2, 2, 1), (2, 2, 2), (2, 2, 1))


def test_anisotropic_strides_pool_per_axis(monkeypatch):
  model = _abstract_model(in_channels=1, base_features=2, strides=ANISO)
  assert model.depth == 3 and model.strides == ANISO
  assert model.features_per_stage == (2, 4, 8, 16)
  pooled = []
  real_pool = unet3d._max_pool

  def recording_pool(x, window):
    pooled.append((x.shape[1:4], tuple(window)))
    return real_pool(x, window)

  monkeypatch.setattr(unet3d, "_max_pool", recording_pool)
  out = _traced_forward(model, jax.ShapeDtypeStruct((2, 16, 16, 8, 1),
                                                    jnp.float32))
  assert out.shape == (2, 16, 16, 8, 2) and out.dtype == jnp.float32
  # z is not pooled at the first and last stages.
  assert pooled == [((16, 16, 8), (2, 2, 1)), ((8, 8, 8), (2, 2, 2)),
                    ((4, 4, 4), (2, 2, 1))]
  # Decoder (coarse to fine): up-conv kernels are the strides.
  assert [block.up.kernel.shape for block in model.decoder] == [
      (2, 2, 1, 16, 8), (2, 2, 2, 8, 4), (2, 2, 1, 4, 2)]
  # z needs only one halving: multiples of 2 suffice (x, y need 8).
  assert _traced_forward(model, jax.ShapeDtypeStruct(
      (1, 8, 16, 2, 1), jnp.float32)).shape == (1, 8, 16, 2, 2)


def test_anisotropic_nondivisible_input_raises():
  model = _abstract_model(in_channels=1, base_features=2, strides=ANISO)
  x = jax.ShapeDtypeStruct((1, 12, 16, 5, 1), jnp.float32)
  pattern = (r"\(12, 16, 5\).*not divisible by \(8, 8, 2\).*"
             r"x=12 is not divisible by 8, z=5 is not divisible by 2")
  with pytest.raises(ValueError, match=pattern):
    model(x)
  with pytest.raises(ValueError, match=pattern):
    _traced_forward(model, x)
  # The default strides keep the old wording (2**depth).
  with pytest.raises(ValueError, match=r"2\*\*depth \(depth=3\).*z=5"):
    _abstract_model(in_channels=1, depth=3, base_features=2)(x)


@pytest.mark.parametrize("strides, match", [
    ([[2, 2, 3]], r"strides\[0\]=\[2, 2, 3\]: expected 3 strides .* 1 or 2"),
    ([[2, 2, 2], [2, 0, 2]], r"strides\[1\]=\[2, 0, 2\]"),
    ([[2, 2]], r"strides\[0\]=\[2, 2\]: expected 3 strides"),
    ([[2, 2, 2, 2]], r"strides\[0\]"),
    ([[2, 2, 1.5]], r"strides\[0\]"),
    ([2, 2, 2], r"strides\[0\]=2: expected 3 strides"),
    ([[1, 1, 1]], r"must pool at least one axis"),
    ("222", r"strides must be a sequence"),
])
def test_bad_strides_raise(strides, match):
  with pytest.raises(ValueError, match=match):
    unet3d.validate_strides(strides)
  with pytest.raises(ValueError, match=match):
    UNet3D(in_channels=1, strides=strides, rngs=_rngs())


def test_inconsistent_options_raise():
  with pytest.raises(ValueError, match=r"depth=2 disagrees with the 3 stages"):
    UNet3D(in_channels=1, depth=2, strides=ANISO, rngs=_rngs())
  with pytest.raises(ValueError, match=r"features_per_stage=\(4, 8\): .* 4 positive"):
    UNet3D(in_channels=1, strides=ANISO, features_per_stage=(4, 8), rngs=_rngs())
  with pytest.raises(ValueError, match=r"features_per_stage=\(4, 0\)"):
    UNet3D(in_channels=1, depth=1, features_per_stage=(4, 0), rngs=_rngs())
  with pytest.raises(ValueError, match=r"base_features=8 disagrees"):
    UNet3D(in_channels=1, depth=1, base_features=8, features_per_stage=(4, 8),
           rngs=_rngs())
  with pytest.raises(ValueError, match=r"'xavier'.*'lecun', 'he'"):
    UNet3D(in_channels=1, init="xavier", rngs=_rngs())
  with pytest.raises(ValueError, match=r"'gelu'.*'relu', 'leaky_relu'"):
    UNet3D(in_channels=1, activation="gelu", rngs=_rngs())
  with pytest.raises(ValueError, match=r"head_bias_init=\(0.0,\).*num_classes=2"):
    UNet3D(in_channels=1, head_bias_init=(0.0,), rngs=_rngs())
  with pytest.raises(ValueError, match=r"head_bias_init=.*finite"):
    UNet3D(in_channels=1, head_bias_init=(0.0, float("-inf")), rngs=_rngs())


def test_param_count_with_strides_and_features_matches_planning():
  from tversky_jax.data import planning  # pylint: disable=import-outside-toplevel
  strides = ((2, 2, 1), (2, 2, 2), (1, 2, 2))
  for features in [(3, 6, 12, 12), (2, 4, 8, 16)]:
    model = _abstract_model(in_channels=2, num_classes=3, strides=strides,
                            features_per_stage=features)
    assert model.base_features == features[0]
    assert count_params(model) == planning.unet_param_count(
        2, 3, features, strides)
  # Hand count of a one-stage net: 3x3x3 convs 1->2, 2->2, bottleneck 2->5,
  # 5->5, up-conv (2, 1, 2) 5->2, decoder 4->2, 2->2, head 2->2.
  model = _abstract_model(in_channels=1, strides=[(2, 1, 2)],
                          features_per_stage=(2, 5))
  expected = ((27 * 1 * 2 + 2) + (27 * 2 * 2 + 2) + (27 * 2 * 5 + 5)
              + (27 * 5 * 5 + 5) + (4 * 5 * 2 + 2) + (27 * 4 * 2 + 2)
              + (27 * 2 * 2 + 2) + (2 * 2 + 2))
  assert count_params(model) == expected


@pytest.mark.parametrize("window", [(2, 2, 1), (1, 2, 2), (2, 1, 1)])
def test_max_pool_any_window_matches_reduce_window(window):
  x = _input(batch=2, channels=3, size=(8, 6, 4))
  np.testing.assert_array_equal(unet3d._max_pool(x, window),
                                nnx.max_pool(x, window, window))


@pytest.mark.parametrize("strides", [(2, 2, 1), (1, 2, 2), (2, 1, 2)])
def test_upconv_any_strides_matches_conv_transpose(strides):
  up = unet3d.UpConv(6, 3, strides=strides, rngs=_rngs())
  ref = nnx.ConvTranspose(6, 3, kernel_size=strides, strides=strides,
                          padding="SAME", rngs=_rngs())
  np.testing.assert_array_equal(up.kernel[...], ref.kernel[...])
  x = _input(batch=2, channels=6, size=(3, 4, 2))
  out = up(x)
  assert out.shape == (2, *(n * s for n, s in zip((3, 4, 2), strides)), 3)
  np.testing.assert_allclose(out, ref(x), rtol=1e-5, atol=1e-5)


def test_2d_sum_equals_native_with_anisotropic_strides():
  kwargs = dict(in_channels=2, features_per_stage=(2, 4, 6),
                strides=((2, 2, 1), (2, 1, 2)), activation="leaky_relu",
                init="he")
  g_native, g_trick, state = _same_state_layout(
      UNet3D(conv_impl="native", rngs=_rngs(), **kwargs),
      UNet3D(conv_impl="2d_sum", rngs=_rngs(1), **kwargs))
  forward = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)
  x = _input(channels=2, size=(8, 4, 6))
  out_native = forward(g_native, state, x)
  out_trick = forward(g_trick, state, x)
  assert out_native.shape == (1, 8, 4, 6, 2)
  assert float(jnp.std(out_native[..., 0])) > 0
  assert _max_rel_diff(out_trick, out_native) < 1e-5


def test_he_init_std():
  cin = 24
  features = (32, 64)
  he = UNet3D(in_channels=cin, features_per_stage=features, strides=[(2, 2, 1)],
              init="he", rngs=_rngs())
  lecun = UNet3D(in_channels=cin, features_per_stage=features,
                 strides=[(2, 2, 1)], rngs=_rngs())
  # (kernel, fan_in): 3x3x3 convs 27 * in; the up-conv (kernel = stride, no
  # overlap) sums exactly `in` = 64 products per output voxel.
  layers = [(lambda m: m.encoder[0].conv2.kernel, 27 * 32),
            (lambda m: m.bottleneck.conv2.kernel, 27 * 64),
            (lambda m: m.decoder[0].block.conv1.kernel, 27 * 64)]
  for kernel, fan_in in layers:
    np.testing.assert_allclose(float(jnp.std(kernel(he)[...])),
                               np.sqrt(2 / fan_in), rtol=0.03)
    np.testing.assert_allclose(float(jnp.std(kernel(lecun)[...])),
                               np.sqrt(1 / fan_in), rtol=0.03)
    assert abs(float(jnp.mean(kernel(he)[...]))) < 0.05 * np.sqrt(2 / fan_in)
  np.testing.assert_allclose(float(jnp.std(he.decoder[0].up.kernel[...])),
                             np.sqrt(2 / 64), rtol=0.05)
  # The default matches nnx.ConvTranspose: fan_in counts the kernel, 4 * 64.
  np.testing.assert_allclose(float(jnp.std(lecun.decoder[0].up.kernel[...])),
                             np.sqrt(1 / (4 * 64)), rtol=0.05)
  for model in (he, lecun):
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
      if leaf.ndim == 1:  # biases start at zero
        assert not np.any(leaf)


def test_head_bias_init_and_leaky_relu():
  priors = np.array([0.95, 0.05])
  model = UNet3D(in_channels=1, depth=1, base_features=2,
                 head_bias_init=np.log(priors), rngs=_rngs())
  np.testing.assert_allclose(model.head.bias[...], np.log(priors), rtol=1e-6)
  # With the head's kernel zeroed the logits are the bias: the priors.
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, _input(channels=1, size=(4, 4, 4)))
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(probs, np.broadcast_to(priors, probs.shape),
                             rtol=1e-5)

  # Leaky ReLU: same parameters, negative outputs survive.
  relu = unet3d.ConvBlock(1, 4, normalization="none", dtype=jnp.float32,
                          conv_impl="native", rngs=_rngs())
  leaky = unet3d.ConvBlock(1, 4, normalization="none", dtype=jnp.float32,
                           conv_impl="native", activation="leaky_relu",
                           rngs=_rngs())
  x = _input(channels=1, size=(4, 4, 4))

  @nnx.jit
  def outputs(relu, leaky, x):
    act = lambda v: jnp.where(v > 0, v, 0.01 * v)
    by_hand = act(leaky.conv2(act(leaky.conv1(x))))
    return relu(x), leaky(x), by_hand

  out_relu, out_leaky, by_hand = outputs(relu, leaky, x)
  assert float(jnp.min(out_relu)) == 0.0
  assert float(jnp.min(out_leaky)) < 0.0
  np.testing.assert_allclose(out_leaky, by_hand, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation, reference", [
    ("relu", nnx.relu),
    ("leaky_relu", lambda x: nnx.leaky_relu(x, negative_slope=unet3d.LEAKY_RELU_SLOPE))])
def test_activation_values_and_gradients_match_flax(activation, reference):
  # Its gradient is computed from the output (so the input need not be kept).
  x = jnp.array([-2.0, -0.5, 0.25, 3.0, -1e-8, 1e-8])
  g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  ours = lambda x: unet3d._activate(x, activation, from_output=True)
  np.testing.assert_array_equal(ours(x), reference(x))
  np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(reference, x)[1](g)[0],
                             rtol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_fused_instance_norm_and_activation_match_flax(activation):
  # The oneDNN path's instance norm + activation, with a hand-written
  # gradient that keeps the input and the output only.
  slope = unet3d.LEAKY_RELU_SLOPE if activation == "leaky_relu" else 0.0
  scale = jnp.array([1.5, -0.5, 0.8])
  bias = jnp.array([0.1, 0.0, -0.3])
  norm = nnx.InstanceNorm(3, scale_init=lambda *_, **__: scale,
                          bias_init=lambda *_, **__: bias, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(norm)
  x = 2.0 + 3.0 * helpers.normal(0, (2, 4, 3, 5, 3))
  g = helpers.normal(1, x.shape)

  def ours(x, scale, bias):
    return unet3d._instance_norm_activate(x, scale, bias, norm.epsilon, slope)

  def reference(x, state):
    return unet3d._activate(nnx.merge(graphdef, state)(x), activation)

  out, vjp = jax.vjp(ours, x, scale, bias)
  ref_out, ref_vjp = jax.vjp(reference, x, state)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
  d_x, d_scale, d_bias = vjp(g)
  ref_d_x, ref_d_state = ref_vjp(g)
  np.testing.assert_allclose(d_x, ref_d_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d_scale, ref_d_state["scale"][...], rtol=1e-4)
  np.testing.assert_allclose(d_bias, ref_d_state["bias"][...], rtol=1e-4)


def test_fused_instance_norm_gradient_as_accurate_as_flax_far_from_zero():
  # The fused gradient sums dz * x and subtracts mean * sum(dz) (it never
  # forms x - mean, which XLA would keep from the forward pass). With a
  # mean 100x the spread, its error against a float64 NumPy reference is
  # that of Flax's (both inherit the float32 statistics).
  x = 50.0 + 0.5 * helpers.normal(0, (2, 4, 3, 5, 3))
  g = helpers.normal(1, x.shape)
  scale = jnp.array([1.5, -0.5, 0.8])
  norm = nnx.InstanceNorm(3, scale_init=lambda *_, **__: scale, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(norm)
  epsilon = norm.epsilon
  d_x, d_scale = jax.vjp(
      lambda x, s: unet3d._instance_norm_activate(x, s, jnp.zeros(3), epsilon, 0.0),
      x, scale)[1](g)
  flax_d_x, flax_d_state = jax.vjp(
      lambda x, state: nnx.relu(nnx.merge(graphdef, state)(x)), x, state)[1](g)
  flax_d_scale = flax_d_state["scale"][...]
  x64, g64, s64 = (np.asarray(a, np.float64) for a in (x, g, scale))
  mean = x64.mean(axis=(1, 2, 3), keepdims=True)
  x_hat = (x64 - mean) / np.sqrt(x64.var(axis=(1, 2, 3), keepdims=True) + epsilon)
  dz = np.where(x_hat * s64 > 0, g64, 0.0)
  n = np.prod(x.shape[1:4])
  sum_dz = dz.sum(axis=(1, 2, 3), keepdims=True)
  sum_dz_x_hat = (dz * x_hat).sum(axis=(1, 2, 3), keepdims=True)
  true_d_x = (s64 / np.sqrt(x64.var(axis=(1, 2, 3), keepdims=True) + epsilon)
              * (dz - sum_dz / n - x_hat * sum_dz_x_hat / n))
  true_d_scale = sum_dz_x_hat.sum(axis=(0, 1, 2, 3))
  error = lambda a, b: np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
  # (2x: room for another CPU's reduction order; a cancellation would be
  # orders of magnitude.)
  assert error(d_x, true_d_x) <= 2.0 * error(flax_d_x, true_d_x) + 1e-6
  assert error(d_scale, true_d_scale) <= 2.0 * error(flax_d_scale, true_d_scale) + 1e-6
