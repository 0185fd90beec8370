"""The sp8192 records' optimizer and schedule pieces (issue 23, item 3): MuonEq-R, Polar Express, MIN_LR and
AdamW's decoupled weight decay per Adam group, each checked against a plain numpy reference written from
RECORDS_SP8192.md section 6, through the compiled update the training step runs."""
import math
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt_mlx as T
from conftest import tiny_env

SHAPE = dict(VOCAB_SIZE="64", NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
             COMPUTE_DTYPE="float32")
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
QUINTIC = (3.4445, -4.7750, 2.0315)


def hp_of(**over):
    return T.Hyperparameters.from_env(dict(SHAPE, **{k: str(v) for k, v in over.items()}))


def ns_ref(u, coeffs):
    """Newton-Schulz from the definition, float64: on the wide orientation, Frobenius-normalised."""
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in coeffs:
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def muon_ref(p, grads, lr, mu, wd, coeffs, row_normalize):
    """Muon steps: buf = mu buf + g; u = g + mu buf; MuonEq-R rows; NS; p (1 - lr wd) - lr sqrt(max(1, r/c)) O."""
    buf = np.zeros_like(p)
    for g in grads:
        buf = mu * buf + g
        u = g + mu * buf
        if row_normalize:
            u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-7)
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p = p * (1 - lr * wd) - lr * scale * ns_ref(u, coeffs)
    return p


def adamw_ref(p, grads, lr, b1, b2, eps, wd):
    """AdamW as the records: p <- p (1 - lr wd), then the bias-corrected Adam step."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def run_updates(hp, n_steps=2, lr_mul=0.5, momentum=0.9, seed=0):
    """(initial params, grads per step, final params), all float64 numpy, after n_steps compiled updates with
    random gradients whose rows differ in scale by orders of magnitude (so row normalisation matters)."""
    mx.random.seed(seed)
    model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
    opt = T.Optimizers(model, hp)
    fns = T.Compiled(model, opt)
    rng = np.random.default_rng(seed)
    p0 = {n: np.array(p, np.float64) for n, p in tree_flatten(model.trainable_parameters())}
    steps = []
    for _ in range(n_steps):
        g = {}
        for n, p in p0.items():
            rows = np.exp(rng.normal(0, 1.5, (p.shape[0], 1))) if p.ndim == 2 else 1.0
            g[n] = (rng.normal(0, 1, p.shape) * rows).astype(np.float32)
        steps.append(g)
        fns.update(tree_unflatten([(n, mx.array(a)) for n, a in g.items()]), mx.array(lr_mul), mx.array(momentum))
    final = {n: np.array(p, np.float64) for n, p in tree_flatten(model.trainable_parameters())}
    return p0, steps, final, opt


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("row_normalize,coeffs", [(1, "polar_express"), (1, "quintic"), (0, "polar_express")])
def test_muon_step_matches_the_numpy_definition(row_normalize, coeffs):
    hp = hp_of(MUON_ROW_NORMALIZE=row_normalize, MUON_NS_COEFFS=coeffs, MUON_WEIGHT_DECAY=0.095, MATRIX_LR=0.026)
    p0, grads, final, opt = run_updates(hp)
    table = PE if coeffs == "polar_express" else [QUINTIC] * 5
    names = [n for n, g in opt.group.items() if g == "muon"]
    assert {p0[n].shape[0] > p0[n].shape[1] for n in names} == {True, False}  # tall (scale > 1) and wide
    for n in names:
        gs = [g[n].astype(np.float64) for g in grads]
        ref = muon_ref(p0[n], gs, 0.026 * 0.5, 0.9, 0.095, table, row_normalize)
        assert rel_err(final[n] - p0[n], ref - p0[n]) < 2e-4, n
        # the check can fail: the other normalisation / coefficient table moves the update by far more
        other = muon_ref(p0[n], gs, 0.026 * 0.5, 0.9, 0.095, table, not row_normalize)
        assert rel_err(other - p0[n], ref - p0[n]) > 1e-2, n
        swapped = muon_ref(p0[n], gs, 0.026 * 0.5, 0.9, 0.095, [QUINTIC] * 5 if table is PE else PE, row_normalize)
        assert rel_err(swapped - p0[n], ref - p0[n]) > 1e-2, n


@pytest.mark.parametrize("steps", [1, 3, 5, 7])
def test_polar_express_iterations_and_more_than_five_repeat_the_last_tuple(steps):
    rng = np.random.default_rng(steps)
    for shape in ((24, 40), (40, 24)):
        u = rng.normal(0, 1, shape)
        got = np.array(T.newton_schulz(mx.array(u.astype(np.float32)), steps, "polar_express"), np.float64)
        ref = ns_ref(u, [PE[min(i, 4)] for i in range(steps)])
        assert rel_err(got, ref) < 1e-4, (shape, steps)
    assert T.ns_coefficients("polar_express", 7)[5:] == [PE[4], PE[4]]
    assert T.ns_coefficients("quintic", steps) == [QUINTIC] * steps


def test_min_lr_floors_the_multiplier():
    frac = hp_of(ITERATIONS=100, WARMDOWN_FRAC=0.85, MIN_LR=0.1, MAX_WALLCLOCK_SECONDS=0)
    assert T.lr_multiplier(0, 0.0, frac) == 1.0
    assert T.lr_multiplier(10, 0.0, frac) == 1.0
    assert T.lr_multiplier(50, 0.0, frac) == pytest.approx(0.5 / 0.85)
    assert T.lr_multiplier(90, 0.0, frac) == pytest.approx(0.1 / 0.85)
    assert T.lr_multiplier(95, 0.0, frac) == 0.1  # (1 - 0.95) / 0.85 = 0.059 would be below the floor
    assert T.lr_multiplier(100, 0.0, frac) == 0.1
    no_floor = hp_of(ITERATIONS=100, WARMDOWN_FRAC=0.85, MAX_WALLCLOCK_SECONDS=0)
    assert T.lr_multiplier(95, 0.0, no_floor) == pytest.approx(0.05 / 0.85)
    iters = hp_of(ITERATIONS=100, WARMDOWN_ITERS=40, MIN_LR=0.25, MAX_WALLCLOCK_SECONDS=0)
    assert T.lr_multiplier(80, 0.0, iters) == 0.5
    assert T.lr_multiplier(95, 0.0, iters) == 0.25
    assert "never below 0.1 (MIN_LR)" in T.describe_warmdown(frac)


@pytest.mark.parametrize("tie", [1, 0])
def test_adamw_decay_per_group_matches_numpy(tie):
    hp = hp_of(TIE_EMBEDDINGS=tie, EMBED_WD=0.085, ADAM_WD=0.02, BETA2=0.99, TIED_EMBED_LR=0.03, EMBED_LR=0.3,
               SCALAR_LR=0.02, HEAD_LR=0.008)
    p0, grads, final, opt = run_updates(hp, n_steps=3, lr_mul=0.5)
    lr = {"embed": 0.03 if tie else 0.3, "scalar": 0.02, "head": 0.008}
    wd = {"embed": 0.085, "scalar": 0.02, "head": 0.02}
    seen = set()
    for n, g in opt.group.items():
        if g == "muon":
            continue
        seen.add(g)
        gs = [s[n].astype(np.float64) for s in grads]
        ref = adamw_ref(p0[n], gs, lr[g] * 0.5, 0.9, 0.99, 1e-8, wd[g])
        np.testing.assert_allclose(final[n], ref, rtol=1e-5, atol=1e-6, err_msg=n)
        plain = adamw_ref(p0[n], gs, lr[g] * 0.5, 0.9, 0.99, 1e-8, 0.0)
        if np.abs(p0[n]).max() > 0.1:  # the decay is visible on it (zero-init scalars decay nothing)
            assert np.abs(plain - ref).max() > 1e-5, n
    assert seen == ({"embed", "scalar"} if tie else {"embed", "scalar", "head"})


def test_unset_and_explicit_off_are_bit_identical():
    _, _, unset, opt = run_updates(hp_of())
    _, _, off, _ = run_updates(hp_of(MUON_ROW_NORMALIZE=0, MUON_NS_COEFFS="quintic", EMBED_WD=0, ADAM_WD=0,
                                     MIN_LR=0))
    assert all(type(o) in (T.Muon, T.optim.Adam) for o in opt.opts.values())
    for n in unset:
        assert np.array_equal(unset[n], off[n]), n


@pytest.mark.parametrize("over,var", [(dict(MUON_NS_COEFFS="cubic"), "MUON_NS_COEFFS"), (dict(MIN_LR=1.5), "MIN_LR"),
                                      (dict(EMBED_WD=-0.1), "EMBED_WD"), (dict(ADAM_WD=2), "ADAM_WD"),
                                      (dict(MUON_ROW_NORMALIZE="maybe"), "MUON_ROW_NORMALIZE")])
def test_bad_values_name_the_variable(over, var):
    with pytest.raises(T.ConfigError, match=var):
        hp_of(**over)


def test_all_pieces_train_end_to_end(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=8, MUON_ROW_NORMALIZE=1, MUON_NS_COEFFS="polar_express", MIN_LR=0.1,
                   WARMDOWN_FRAC=0.85, EMBED_WD=0.085, ADAM_WD=0.02, MUON_WEIGHT_DECAY=0.095, BETA2=0.99,
                   GRAD_CLIP_NORM=0.3, EMA_DECAY=0.9, EMA_WARMUP=0)
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    hp_line = re.search(r"^hparams: (.*)$", log, re.M)[1].split()
    for kv in ("MUON_ROW_NORMALIZE=True", "MUON_NS_COEFFS=polar_express", "MIN_LR=0.1", "EMBED_WD=0.085",
               "ADAM_WD=0.02"):
        assert kv in hp_line, kv
    losses = [float(m[1]) for m in re.finditer(r"^step:\d+/\d+ train_loss:(\S+)", log, re.M)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert re.search(r"^final_int6_[a-z]+_roundtrip_exact val_loss:[\d.]+ val_bpb:[\d.]+", log, re.M)
