"""GPTQ / SDClip / LQER / brotli benchmark (issue 22; prints the README tables; not a test).

--part gap: trains the tiny 2x128 (MLP x3, seq 128) model on ../shared/fineweb_sample (generated text when
absent) once per seed with QUANT_METHOD=gptq, so the driver calibrates (GPTQ_CALIBRATION_TOKENS, at most what
it trained on); then writes every setting's artifact from the same float weights and Hessians and scores it after
the write/read round trip: bytes (brotli) and gap = post - pre val_bpb, mean ± half-range over the seeds.
--part full: one full shape (sp8192: the 8192-token records' 11x512 MLP x4, V 8192; sp1024: RECIPE=sp1024_record
at 11 layers) trained 2 steps on CPU on synthetic shards (Zipf tokens, the challenge format), calibrated on them,
written with the new pipeline; bytes of each compressor on the same tensors, the fit check's estimate, and the
time of calibration (per 1k tokens), quantization and compression.

    python tests/bench_gptq.py --part gap [--seeds 1337 1338] [--steps 200]
    python tests/bench_gptq.py --part full --shape sp8192 [--calib-tokens 8192] [--codecs zstd lzma brotli]
"""
import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from bench_ablation import load_script, make_data  # noqa: E402
from bench_quant import gap_env, score  # noqa: E402

SDCLIP = dict(QUANT_CLIP="sdclip", QUANT_BITS_EMBED=7)  # k: the defaults (attn 13, MLP 11.5, embed 14)
SETTINGS = {  # name -> env of the artifact knobs; every row int6 blocks
    "rtn, max-abs (today's default)": dict(QUANT_METHOD="rtn"),
    "gptq_lite": dict(QUANT_METHOD="gptq_lite"),
    "gptq, max-abs": dict(QUANT_METHOD="gptq"),
    "rtn, SDClip, int7 embed": dict(SDCLIP, QUANT_METHOD="rtn"),
    "gptq, SDClip, int7 embed": dict(SDCLIP, QUANT_METHOD="gptq"),
    "gptq, SDClip, int7 embed, LQER top-3 r4": dict(SDCLIP, QUANT_METHOD="gptq", LQER_TOP_K=3, LQER_RANK=4),
}
SHAPES = {
    "sp8192": dict(NUM_LAYERS="11", MODEL_DIM="512", MLP_MULT="4", VOCAB_SIZE="8192", NUM_HEADS="8",
                   NUM_KV_HEADS="4", QUANT_METHOD="gptq", QUANT_CLIP="sdclip", QUANT_BITS_EMBED="7",
                   COMPRESSOR="brotli"),
    "sp1024": dict(RECIPE="sp1024_record", NUM_LAYERS="11", QUANT_METHOD="gptq", QUANT_CLIP="sdclip",
                   QUANT_BITS_ATTN="6", QUANT_BITS_MLP="6", QUANT_BITS_EMBED="7", COMPRESSOR="brotli"),
}


def train_tiny(base: dict, seed: int, out: Path):
    """Train through the script's own driver; keep the float weights and Hessians it hands to write_artifact."""
    env = dict(base, SEED=str(seed), RUN_ID=f"g{seed}", OUT_DIR=str(out), QUANT_METHOD="gptq")
    caught, real = {}, T.write_artifact

    def spy(path, flat, cfg, *a, **k):
        caught.update(flat=dict(flat), cfg=cfg, hessians=k["spec"].hessians)
        return real(path, flat, cfg, *a, **k)

    T.write_artifact = spy
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert T.main(env) == 0
    finally:
        T.write_artifact = real
    return caught["flat"], caught["cfg"], caught["hessians"]


def gap_table(seeds, steps):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = gap_env(make_data(tmp), steps)
        hp0 = T.Hyperparameters.from_env(base)
        tables = T.build_byte_tables(T.load_tokenizer(hp0.tokenizer_path), hp0.vocab_size)
        val = T.load_validation_tokens(hp0.data_path, hp0.val_max_tokens, hp0.vocab_size)
        rows = {k: [] for k in SETTINGS}
        pre_all = []
        for seed in seeds:
            flat, cfg, hessians = train_tiny(base, seed, tmp)
            pre = score(flat, cfg, hp0, val, tables)
            pre_all.append(pre)
            for name, over in SETTINGS.items():
                hp = T.Hyperparameters.from_env(dict(base, **{k: str(v) for k, v in over.items()}))
                spec = T.QuantSpec.from_hparams(hp, hessians)
                path = str(tmp / "a.ptz")
                nbytes = T.write_artifact(path, flat, cfg, T.quant_plan(hp), None, codec="brotli", spec=spec)
                post = score(T.read_artifact(path)[1], cfg, hp0, val, tables)
                rows[name].append((post - pre, post, nbytes))
                print(f"#   seed {seed} {name}: pre {pre:.4f} post {post:.4f} bytes {nbytes}", file=sys.stderr)
    ms = lambda xs: f"{statistics.mean(xs):+.4f} ± {(max(xs) - min(xs)) / 2:.4f}"  # noqa: E731
    print(f"\nquantization gap, tiny 2x128 MLPx3, {steps} steps, {len(hessians)} Hessians, seeds {seeds}; pre-quant "
          f"val_bpb {statistics.mean(pre_all):.4f} ({', '.join(f'{p:.4f}' for p in pre_all)})\n")
    print("| setting (int6 blocks) | gap (post - pre) mean ± half-range | post val_bpb | bytes (brotli) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {ms([x[0] for x in r])} | {statistics.mean(x[1] for x in r):.4f} | "
              f"{statistics.mean(x[2] for x in r):,.0f} |")


def synthetic_shards(out: Path, vocab: int, n_train: int, seed: int = 0) -> str:
    """Zipf(1.1)-distributed token ids in the challenge's shard format (no tokenizer of this vocabulary here)."""
    bs = load_script("data/build_shards.py")
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", 65536)):
        ids = np.minimum(rng.zipf(1.1, n) - 1, vocab - 1).astype(np.uint16)
        bs.write_shard(out / f"fineweb_{split}_000000.bin", ids)
    return str(out)


def two_steps(hp):
    """The model after 2 optimizer steps of 2 x 256 tokens on CPU (uncompiled: no compile time at this size)."""
    model = T.GPT(T.ModelConfig.from_hparams(hp))
    opt = T.Optimizers(model, hp)
    fns = T.Compiled(model, opt, compile_fns=False)
    stream = T.TokenStream(T.shard_files(hp.data_path, "train"), hp.vocab_size)
    for step in range(2):
        x, y = stream.next_batch(512, 256)
        mx.eval(T.train_step(fns, x, y, 2, 1.0, hp.muon_momentum))
    return model


def full_table(shape: str, calib_tokens: int, codecs: list):
    with tempfile.TemporaryDirectory() as tmp:
        over = dict(SHAPES[shape], DATA_PATH=synthetic_shards(Path(tmp), int(SHAPES[shape].get("VOCAB_SIZE", 1024)),
                                                              max(calib_tokens, 4096) + 4096))
        hp = T.Hyperparameters.from_env(over)
        mx.random.seed(0)
        t0 = time.perf_counter()
        model = two_steps(hp)
        t_train = time.perf_counter() - t0
        flat = T.flat_numpy(model)
        stream = T.TokenStream(T.shard_files(hp.data_path, "train"), hp.vocab_size)
        t0 = time.perf_counter()
        hessians = T.collect_hessians(model, stream, calib_tokens, 256, 2048)
        t_calib = time.perf_counter() - t0
        spec = T.QuantSpec.from_hparams(hp, hessians)
        plan = T.quant_plan(hp)
        estimate = T.estimate_model_bytes(model, plan, spec, hp.compressor)
        t0 = time.perf_counter()
        arrays = T.pack_state(flat, plan, spec=spec)
        t_quant = time.perf_counter() - t0
        code = len(T.counted_script())
        params = sum(a.size for a in flat.values())
        print(f"\nfull shape {shape}: {params:,} params, 2 CPU steps in {t_train:.0f}s; calibration {calib_tokens} "
              f"tokens ({len(hessians)} Hessians) in {t_calib:.1f}s = {1000 * t_calib / calib_tokens:.2f}s per 1k "
              f"tokens; quantization (GPTQ, {plan}) {t_quant:.1f}s; packed code {code:,} bytes; "
              f"estimate {estimate:,}\n")
        print("| compressor | model bytes | + code | fits | estimate / real | compress s |")
        print("|---|---|---|---|---|---|")
        header = dict(format="parameter-golf-mlx", version=1, quant_bits=plan, config={}, meta={})
        for codec in codecs:
            t0 = time.perf_counter()
            n = T.write_container(f"{tmp}/a", T.ARTIFACT_MAGIC, header, arrays, 22, codec)
            dt = time.perf_counter() - t0
            print(f"| {codec} | {n:,} | {n + code:,} | {'yes' if n + code < T.ARTIFACT_CAP_BYTES else 'NO'} | "
                  f"{estimate / n:.3f} | {dt:.0f} |", flush=True)
        if "brotli" in codecs:
            import brotli
            payload = b"".join(np.ascontiguousarray(a).tobytes() for _, _, a in arrays)
            t0 = time.perf_counter()
            n = len(brotli.compress(payload, quality=11, lgwin=24))
            print(f"| brotli without the shuffle (arrays only) | {n:,} | | | | {time.perf_counter() - t0:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("gap", "full"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--shape", choices=tuple(SHAPES), default="sp8192")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--codecs", nargs="+", default=["zstd", "lzma", "brotli"])
    a = p.parse_args()
    mx.random.seed(0)
    if a.part == "gap":
        gap_table(a.seeds, a.steps)
    else:
        full_table(a.shape, a.calib_tokens, a.codecs)


if __name__ == "__main__":
    main()
