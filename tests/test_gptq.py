"""Full-Hessian GPTQ, SDClip, LQER, gates, brotli (issue 22): each piece against a plain numpy reference written
from its definition, and a tiny end-to-end run that calibrates, writes and re-scores its artifact."""
import re

import mlx.core as mx
import numpy as np
import pytest

import train_gpt_mlx as T
from conftest import tiny_env


def hp_of(**over):
    env = dict(VOCAB_SIZE="128", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2")
    env.update({k: str(v) for k, v in over.items()})
    return T.Hyperparameters.from_env(env)


def correlated_inputs(rng, n: int, cols: int) -> np.ndarray:
    """Inputs with correlated, unequally scaled features (as real activations are): GPTQ's error feedback has
    something to exploit only then."""
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    return (rng.standard_normal((n, cols)) @ mix * rng.lognormal(0.0, 0.7, cols)).astype(np.float32)


def problem(seed: int, rows: int = 24, cols: int = 48):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, (rows, cols)) * 0.05).astype(np.float32)
    x = correlated_inputs(rng, 4 * cols, cols)
    return w, (x.T @ x).astype(np.float32)


# ---------------------------------------------------------------------------- references, from the definitions
def ref_gptq(w, bits, H, scale, damp=0.01):
    """Optimal Brain Quantization one column at a time, without Cholesky or blocks: quantize column j (columns by
    descending damped diag H), then move every column F not yet quantized by -(w_j - q_j s)/[H_F⁻¹]_jj [H_F⁻¹]_j,:
    with H_F⁻¹ the inverse of H restricted to j and F, recomputed each time."""
    qmax = 2 ** (bits - 1) - 1
    H = H.astype(np.float64).copy()
    W = w.astype(np.float64).copy()
    for j in range(H.shape[0]):
        if H[j, j] <= 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    order = sorted(range(H.shape[0]), key=lambda j: (-H[j, j], j))
    s = scale.astype(np.float64)
    Q = np.zeros(W.shape, np.int8)
    for t, j in enumerate(order):
        F = order[t:]  # j first
        Hinv = np.linalg.inv(H[np.ix_(F, F)])
        for r in range(W.shape[0]):
            q = min(max(round(W[r, j] / s[r]), -qmax), qmax)
            Q[r, j] = q
            e = (W[r, j] - q * s[r]) / Hinv[0, 0]
            for c, f in enumerate(F):
                W[r, f] -= e * Hinv[0, c]
    return Q


def ref_sdclip(w, bits, k):
    """s_r = k·std(W_r)/(2^(b-1)-1) in fp16; q = clamp(round(w/s), ±qmax)."""
    qmax = 2 ** (bits - 1) - 1
    q = np.zeros(w.shape, np.int8)
    s = np.zeros(w.shape[0], np.float16)
    for r in range(w.shape[0]):
        row = [float(v) for v in w[r]]
        mean = sum(row) / len(row)
        std = (sum((v - mean) ** 2 for v in row) / len(row)) ** 0.5
        s[r] = np.float16(max(k * std / qmax, 2.0 ** -24))
        for c, v in enumerate(row):
            q[r, c] = min(max(round(v / float(s[r])), -qmax), qmax)
    return q, s


def ref_lqer(E, rank):
    """Truncated SVD, A = U_r S_r, B = V_rᵀ; A int2 levels [-2, 1] at one scale |A|max/1.5 (fp16); B flattened in
    groups of 64, int4 levels [-8, 7] at max|group|/7.5 (fp16). -> Â·B̂"""
    U, S, Vt = np.linalg.svd(E.astype(np.float64), full_matrices=False)
    A = U[:, :rank] * S[:rank]
    B = Vt[:rank]
    sa = float(np.float16(np.abs(A).max() / 1.5))
    Ah = np.array([[min(max(round(a / sa), -2), 1) * sa for a in row] for row in A])
    flat = list(B.reshape(-1))
    Bh = []
    for g in range(0, len(flat), 64):
        group = flat[g:g + 64]
        sb = float(np.float16(max(abs(v) for v in group) / 7.5))
        Bh += [min(max(round(v / sb), -8), 7) * sb for v in group]
    return Ah @ np.array(Bh).reshape(B.shape)


# ---------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("bits", [5, 6])
def test_gptq_is_never_worse_than_gptq_lite_on_the_same_weights_and_bits(bits):
    """Output error tr(E H Eᵀ) on the calibration inputs, GPTQ vs GPTQ-lite, same weights, same bits; GPTQ's
    error feedback must also win clearly on average (it is not just the fallback)."""
    ratios = []
    for seed in range(6):
        w, H = problem(seed, rows=32, cols=160)  # > 128 columns: two blocks
        lite = T.gptq_lite_rows(w, bits)
        spec = T.QuantSpec(method="gptq", hessians={"m.weight": H})
        q, s = T.quantize_matrix("m.weight", w, bits, spec)
        e_gptq = T.weighted_error(w, q, s, H)
        e_lite = T.weighted_error(w, lite[0], lite[1], H)
        assert e_gptq <= e_lite
        ratios.append(e_gptq / e_lite)
    assert np.mean(ratios) < 0.8


def test_gptq_error_feedback_matches_the_obs_reference():
    """The blocked, Cholesky-based GPTQ equals column-by-column OBQ with the re-inverted Hessian (small blocks, so
    both the in-block and the cross-block pushes are exercised), and differs from plain rounding."""
    for seed in range(3):
        w, H = problem(seed)
        H[:, 5] = H[5, :] = 0.0  # a dead input
        q0, s = T.quantize_rows(w, 6, T.sdclip(w, 12.0))
        q = T.gptq_rows(w, 6, H, s, block=16)
        ref = ref_gptq(w, 6, H, s)
        assert np.mean(q == ref) > 0.99  # float32 vs float64: a rare tie may round the other way
        assert T.weighted_error(w, q, s, H) == pytest.approx(T.weighted_error(w, ref, s, H), rel=1e-3)
        assert np.mean(q == q0) < 0.9 and (q[:, 5] == 0).all()


def test_sdclip_matches_the_reference():
    rng = np.random.default_rng(1)
    w = (rng.standard_t(4, (20, 70)) * 0.03).astype(np.float32)
    w[3] = 0.0  # a zero row: the floor scale, all codes 0
    for bits, k in ((6, 11.5), (7, 14.0), (5, 3.0)):
        q, s = T.quantize_rows(w, bits, T.sdclip(w, k))
        rq, rs = ref_sdclip(w, bits, k)
        assert np.array_equal(s, rs) and np.mean(q == rq) > 0.999


def test_lqer_matches_the_reference_and_shrinks_the_error():
    rng = np.random.default_rng(2)
    E = (rng.standard_normal((40, 50)) @ np.diag(np.linspace(2, 0.1, 50)) * 0.01).astype(np.float32)
    corr = T.lqer_correction(*T.lqer_factors(E, 4), E.shape[1])
    assert np.allclose(corr, ref_lqer(E, 4), rtol=1e-3, atol=1e-6)
    assert np.linalg.norm(E - corr) < np.linalg.norm(E)


def test_lqer_artifact_corrects_only_the_top_k_matrices(tmp_path):
    hp = hp_of(QUANT_CLIP="sdclip", LQER_TOP_K=2, LQER_RANK=3)
    cfg = T.ModelConfig.from_hparams(hp)
    rng = np.random.default_rng(3)
    flat = {n: (rng.standard_t(4, w.shape) * 0.05).astype(np.float32) for n, w in T.flat_numpy(T.GPT(cfg)).items()}
    spec = T.QuantSpec.from_hparams(hp)
    path = str(tmp_path / "a.ptz")
    T.write_artifact(path, flat, cfg, T.quant_plan(hp), spec=spec)
    _, back, header = T.read_artifact(path)
    plain = str(tmp_path / "b.ptz")
    T.write_artifact(plain, flat, cfg, T.quant_plan(hp), spec=T.QuantSpec.from_hparams(hp_of(QUANT_CLIP="sdclip")))
    _, base, _ = T.read_artifact(plain)
    errs = {n: np.linalg.norm(flat[n] - base[n]) for n in flat if T.is_quantized(n, flat[n].shape)}
    top = sorted(errs, key=errs.get)[-2:]
    assert header["quant"]["lqer"] == dict(top_k=2, rank=3)
    for n in errs:
        if n in top:
            assert np.linalg.norm(flat[n] - back[n]) < errs[n]
        else:
            assert np.array_equal(back[n], base[n])


def test_gates_are_int8_per_row_and_never_gptqd():
    w = np.random.default_rng(4).standard_normal((4, 12)).astype(np.float32)
    name = "blocks.0.attn.gate_w"
    assert T.tensor_bits(name, dict(attn=6, mlp=6, embed=7, other=6)) == 8 and T.tensor_bits(name, 5) == 8
    spec = T.QuantSpec(method="gptq", clip="sdclip", k=dict(attn=1.0), hessians={name: np.eye(12, dtype=np.float32)})
    q, s = T.quantize_matrix(name, w, 8, spec)
    q0, s0 = T.quantize_rows(w, 8)
    assert np.array_equal(q, q0) and np.array_equal(s, s0)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
def test_byte_shuffle_round_trip(n):
    data = bytes(range(n))
    sh = T.byte_shuffle(data)
    assert sh[:n // 2] == data[0:n - n % 2:2] and T.byte_unshuffle(sh) == data


def test_hessians_cover_every_linear_and_the_tied_head_and_sum_over_passes():
    hp = hp_of(NUM_LAYERS=3, RECUR_LAYERS="1,1")
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    ids = np.random.default_rng(5).integers(0, 128, 4 * 16).astype(np.uint16)
    linears = {n for n, p in T.tree_flatten(model.parameters()) if n.endswith(".weight") and "blocks" in n}
    H = T.collect_hessians(model, T_stream(ids), 64, 16, 32)
    assert set(H) == linears | {"tok_emb.weight"}
    model.recur_on = False
    H1 = T.collect_hessians(model, T_stream(ids), 64, 16, 32)
    model.recur_on = True
    extra = H["blocks.1.mlp.fc.weight"] - H1["blocks.1.mlp.fc.weight"]  # layer 1 ran twice: one more pass summed
    assert np.linalg.eigvalsh(extra.astype(np.float64)).min() > -1e-3 * np.abs(extra).max()
    assert np.abs(extra).max() > 0.1 * np.abs(H1["blocks.1.mlp.fc.weight"]).max()
    assert np.allclose(H["blocks.0.mlp.fc.weight"], H1["blocks.0.mlp.fc.weight"], rtol=1e-4, atol=1e-3)
    assert H["tok_emb.weight"].shape == (32, 32)


class T_stream:
    """A stand-in for TokenStream.take over fixed tokens, restarting each time it is built."""

    def __init__(self, ids):
        self.ids = ids
        self.pos = 0

    def take(self, n):
        out = self.ids[self.pos:self.pos + n]
        self.pos += n
        return out


def test_reserve_shortens_training_only_under_gptq():
    assert T.train_budget_ms(hp_of(MAX_WALLCLOCK_SECONDS=600)) == 600_000
    assert T.train_budget_ms(hp_of(MAX_WALLCLOCK_SECONDS=600, QUANT_METHOD="gptq")) == 592_000
    assert T.train_budget_ms(hp_of(MAX_WALLCLOCK_SECONDS=0, QUANT_METHOD="gptq")) == 0
    with pytest.raises(T.ConfigError, match="GPTQ_LITE=1"):
        hp_of(GPTQ_LITE=1, QUANT_METHOD="gptq")
    with pytest.raises(T.ConfigError, match="QUANT_CLIP=sdclip"):
        hp_of(GPTQ_LITE=1, QUANT_CLIP="sdclip")
    assert hp_of(GPTQ_LITE=1).quant_method_resolved == "gptq_lite"


def test_tiny_run_with_gptq_writes_and_rescores_its_artifact(data, tmp_path):
    env = tiny_env(data, tmp_path, ITERATIONS=6, QUANT_METHOD="gptq", QUANT_CLIP="sdclip", QUANT_BITS_EMBED=7,
                   LQER_TOP_K=2, COMPRESSOR="brotli", GPTQ_CALIBRATION_TOKENS=100_000)
    assert T.main(env) == 0
    log = (tmp_path / "tiny.txt").read_text()
    n = int(re.search(r"^gptq: calibration on (\d+) train tokens \((\d+) Hessians\)", log, re.M)[1])
    assert n == 6 * 1024  # capped at what the run trained on (6 steps x 1024 tokens), not 100,000
    assert re.search(r"^artifact_time: quantize:[\d.]+s compress:[\d.]+s", log, re.M)
    pre = float(re.search(r"^step:6/6 val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    post = float(re.search(r"^final_int6_brotli_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log, re.M)[1])
    assert abs(post - pre) < 0.05
    art = tmp_path / "tiny_model.int6.ptz"
    _, _, header = T.read_artifact(str(art))
    assert header["codec"] == "brotli" and header["quant"]["method"] == "gptq"
    assert header["quant"]["gptq_hessians"] == 2 * 6 + 1 and header["quant"]["lqer"]["top_k"] == 2
    assert T.main(tiny_env(data, tmp_path, RUN_ID="ev", EVAL_ONLY=1, LOAD_ARTIFACT=art)) == 0
    again = float(re.search(r"^eval_only_exact val_loss:[\d.]+ val_bpb:([\d.]+)",
                            (tmp_path / "ev.txt").read_text(), re.M)[1])
    assert again == pytest.approx(post, abs=1e-6)


def test_an_indefinite_hessian_falls_back_to_the_plain_rounding():
    w = np.random.default_rng(6).standard_normal((6, 2)).astype(np.float32)
    H = np.array([[1.0, 5.0], [5.0, 1.0]], np.float32)  # not a sum of XᵀX: damping cannot make it definite
    with pytest.raises(np.linalg.LinAlgError):
        T.upper_cholesky_of_inverse(T.gptq_order(H, 0.01)[1])
    q, s = T.quantize_matrix("m.weight", w, 6, T.QuantSpec(method="gptq", clip="sdclip", k=dict(other=3.0),
                                                           hessians={"m.weight": H}))
    q0, s0 = T.quantize_rows(w, 6, T.sdclip(w, 3.0))
    assert np.array_equal(q, q0) and np.array_equal(s, s0)
