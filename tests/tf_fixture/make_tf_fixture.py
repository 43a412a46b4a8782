"""Write the TensorFlow checkpoint fixture that `tests/test_interop_tf.py` reads.

Run with TensorFlow installed (it is not a dependency of convbert, nor of its tests):

    pip install tensorflow-cpu && python tests/tf_fixture/make_tf_fixture.py [OUTPUT_DIR]

It saves, with `tf.compat.v1.train.Saver` as the original ConvBERT code does, a tiny pre-training checkpoint under the
original variable names (spec §1.9): discriminator `electra/`, generator `generator/` sharing `electra/embeddings`,
both heads, AdamWeightDecay's `adam_m`/`adam_v` slots and `global_step`, plus a bfloat16 probe. Values are seeded
random numbers in TensorFlow's layouts. Next to it, `reference.safetensors` holds what TensorFlow's own ops compute
from those weights on a fixed input: layer 0's separable convolution (`conv_attn_key`, as `tf.layers.separable_conv1d`
computes it) and its grouped FFN (`g_dense`, as the original's grouped dense computes it), so the test checks the
layout conversions by what the layers do, not by re-stating them. The fixture's sizes are off the presets on
purpose (kernel 5, a 1-head generator) so that the converter must read them off the shapes.
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
VOCAB, EMB, POS, TYPES = 40, 16, 32, 2
DISC = dict(hidden=24, heads=4, layers=2, ffn=48, groups=2, kernel=5)   # Nr = 2, branch A = 12
GEN = dict(hidden=12, heads=1, layers=2, ffn=48, groups=2, kernel=5)    # heads < head_ratio: Nr = 1, A = 12
rng = np.random.default_rng(1234)


def rand(*shape):
    return rng.normal(0, 0.2, shape).astype(np.float32)


def encoder(scope, cfg, shared_embeddings):
    h, a = cfg["hidden"], cfg["hidden"] // cfg["heads"] * max(1, cfg["heads"] // 2)
    nr, k, g, f = max(1, cfg["heads"] // 2), cfg["kernel"], cfg["groups"], cfg["ffn"]
    v = {}
    if not shared_embeddings:
        v[f"{scope}/embeddings/word_embeddings"] = rand(VOCAB, EMB)
        v[f"{scope}/embeddings/position_embeddings"] = rand(POS, EMB)
        v[f"{scope}/embeddings/token_type_embeddings"] = rand(TYPES, EMB)
        v[f"{scope}/embeddings/LayerNorm/gamma"] = 1 + rand(EMB)
        v[f"{scope}/embeddings/LayerNorm/beta"] = rand(EMB)
    v[f"{scope}/embeddings_project/kernel"] = rand(EMB, h)
    v[f"{scope}/embeddings_project/bias"] = rand(h)
    for i in range(cfg["layers"]):
        p = f"{scope}/encoder/layer_{i}"
        for name in ("query", "key", "value"):
            v[f"{p}/attention/self/{name}/kernel"] = rand(h, a)
            v[f"{p}/attention/self/{name}/bias"] = rand(a)
        v[f"{p}/attention/self/conv_attn_key/depthwise_kernel"] = rand(k, h, 1)
        v[f"{p}/attention/self/conv_attn_key/pointwise_kernel"] = rand(1, h, a)
        v[f"{p}/attention/self/conv_attn_key/bias"] = rand(a)
        v[f"{p}/attention/self/conv_attn_kernel/kernel"] = rand(a, nr * k)
        v[f"{p}/attention/self/conv_attn_kernel/bias"] = rand(nr * k)
        v[f"{p}/attention/self/conv_attn_point/kernel"] = rand(h, a)
        v[f"{p}/attention/self/conv_attn_point/bias"] = rand(a)
        v[f"{p}/attention/output/dense/kernel"] = rand(2 * a, h)
        v[f"{p}/attention/output/dense/bias"] = rand(h)
        v[f"{p}/attention/output/LayerNorm/gamma"] = 1 + rand(h)
        v[f"{p}/attention/output/LayerNorm/beta"] = rand(h)
        v[f"{p}/intermediate/g_dense/kernel"] = rand(g, h // g, f // g)
        v[f"{p}/intermediate/g_dense/bias"] = rand(f)
        v[f"{p}/output/g_dense/kernel"] = rand(g, f // g, h // g)
        v[f"{p}/output/g_dense/bias"] = rand(h)
        v[f"{p}/output/LayerNorm/gamma"] = 1 + rand(h)
        v[f"{p}/output/LayerNorm/beta"] = rand(h)
    return v


weights = {}
weights.update(encoder("electra", DISC, shared_embeddings=False))
weights.update(encoder("generator", GEN, shared_embeddings=True))
weights.update({
    "generator_predictions/dense/kernel": rand(GEN["hidden"], EMB),
    "generator_predictions/dense/bias": rand(EMB),
    "generator_predictions/LayerNorm/gamma": 1 + rand(EMB),
    "generator_predictions/LayerNorm/beta": rand(EMB),
    "generator_predictions/output_bias": rand(VOCAB),
    "discriminator_predictions/dense/kernel": rand(DISC["hidden"], DISC["hidden"]),
    "discriminator_predictions/dense/bias": rand(DISC["hidden"]),
    "discriminator_predictions/dense_1/kernel": rand(DISC["hidden"], 1),
    "discriminator_predictions/dense_1/bias": rand(1),
})

tf.compat.v1.disable_eager_execution()
graph = tf.Graph()
with graph.as_default():
    variables = {}
    for name, value in weights.items():
        variables[name] = tf.compat.v1.get_variable(name, initializer=value)
        for slot in ("adam_m", "adam_v"):
            tf.compat.v1.get_variable(f"{name}/{slot}", initializer=np.abs(rand(*value.shape)))
    step = tf.compat.v1.get_variable("global_step", initializer=np.int64(1234), dtype=tf.int64)
    probe = tf.compat.v1.get_variable("probe/bfloat16", initializer=tf.constant([1.5, -2.25, 3.0e5], tf.bfloat16))

    # What TF's own ops make of layer 0's weights on a fixed input.
    x = tf.constant(rand(2, 7, DISC["hidden"]))
    p = "electra/encoder/layer_0"
    dw = variables[f"{p}/attention/self/conv_attn_key/depthwise_kernel"]
    pw = variables[f"{p}/attention/self/conv_attn_key/pointwise_kernel"]
    conv = tf.nn.separable_conv2d(x[:, None], dw[None], pw[None], strides=[1, 1, 1, 1], padding="SAME")[:, 0]
    conv = conv + variables[f"{p}/attention/self/conv_attn_key/bias"]
    g = DISC["groups"]
    kernel = variables[f"{p}/intermediate/g_dense/kernel"]
    grouped = tf.einsum("btgi,gio->btgo", tf.reshape(x, [2, 7, g, DISC["hidden"] // g]), kernel)
    grouped = tf.reshape(grouped, [2, 7, DISC["ffn"]]) + variables[f"{p}/intermediate/g_dense/bias"]

    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        OUT.mkdir(parents=True, exist_ok=True)
        saver.save(session, str(OUT / "model.ckpt"), global_step=step, write_meta_graph=False)
        x_value, conv_value, grouped_value = session.run([x, conv, grouped])

(OUT / "checkpoint").unlink(missing_ok=True)  # holds this machine's absolute path; the test names the prefix
save_file({"input": x_value, "separable_conv": conv_value, "grouped_dense": grouped_value},
          str(OUT / "reference.safetensors"))
print(f"wrote {OUT}/model.ckpt-1234.* and reference.safetensors")
