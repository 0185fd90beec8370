"""Evaluation benchmark (prints numbers; not a test): trains a tiny model on shards built from
../shared/fineweb_sample (generated text when absent), then measures
  1. tokens/s and peak memory of plain, sliding and sliding + n-gram mixer evaluation at two
     split sizes (cost per token should not grow with the split), and
  2. val_bpb on the sample's whole val split for standard, sliding and mixer variants.

    python tests/bench_eval.py [--steps 150] [--stride 64]
"""
import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from bench_ablation import make_data  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--batch-seqs", type=int, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        env = dict(data, ITERATIONS=str(a.steps), TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN=str(a.seq),
                   GRAD_ACCUM_STEPS="1", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2",
                   WARMUP_STEPS="2", WARMDOWN_ITERS=str(a.steps // 3), MAX_WALLCLOCK_SECONDS="0",
                   VAL_MAX_TOKENS="4096", RUN_ID="m", OUT_DIR=str(tmp))
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            assert T.main(env) == 0
        print(f"trained the tiny model ({a.steps} steps) in {time.time() - t0:.0f}s", file=sys.stderr)
        cfg, flat, _ = T.read_artifact(str(tmp / "m_model.int6.ptz"))
        hp = T.Hyperparameters.from_env(env)
        model = T.GPT(cfg, hp.dtype())
        T.load_flat_into(model, flat)
        fns = T.Compiled(model, T.Optimizers(model, hp))
        tables = T.build_byte_tables(T.load_tokenizer(data["TOKENIZER_PATH"]), cfg.vocab_size)
        val = T.load_validation_tokens(data["DATA_PATH"], 0, cfg.vocab_size)
        V, L, B = cfg.vocab_size, a.seq, a.batch_seqs

        def run(toks, stride, mix=None, mode="entropy"):
            mixer = T.BackoffNgramMixer(V, *mix, mode) if mix else None  # mix = (order, alpha)
            fn = fns.token_stats if mix and mode == "entropy" else fns.token_nll
            mx.reset_peak_memory()
            t = time.perf_counter()
            loss, bpb, nll = T.evaluate(fn, toks, L, B, tables, stride=stride, mixer=mixer)
            return bpb, nll.size / (time.perf_counter() - t), mx.get_peak_memory() / 2**20

        run(val[:L * B + 1], a.stride, (4, 0.3))  # compile every graph once
        run(val[:L * B + 1], 0)
        print(f"\n{mx.default_device()}, mlx {mx.__version__}; model 2x128 trained {a.steps} steps on the sample; "
              f"eval seq {L}, batch {B} windows, sliding stride {a.stride}; mixer: order 4 (exact contexts), "
              f"chunk 2048, entropy alpha 0.3\n")
        print("| eval | tokens | tokens/s | peak MiB |\n|---|---|---|---|")
        for n in (40_000, 130_000):
            toks = val[:n + 1]
            for name, kw in (("plain", dict(stride=0)), (f"sliding {a.stride}", dict(stride=a.stride)),
                             (f"sliding {a.stride} + mixer", dict(stride=a.stride, mix=(4, 0.3)))):
                _, tps, mem = run(toks, **kw)
                print(f"| {name} | {n:,} | {tps:,.0f} | {mem:.0f} |")
        print(f"\nval_bpb on the sample's whole val split ({val.size - 1:,} targets):\n")
        print("| eval | val_bpb | Δ vs standard |\n|---|---|---|")
        base = None
        rows = [("standard", dict(stride=0)), (f"sliding {a.stride}", dict(stride=a.stride))]
        for mode, alpha, order in (("fixed", 0.3, 1), ("fixed", 0.3, 2), ("fixed", 0.3, 4), ("entropy", 0.3, 4),
                                   ("fixed", 0.7, 4), ("entropy", 0.7, 4)):
            rows.append((f"sliding {a.stride} + mixer {mode} α={alpha} order {order}",
                         dict(stride=a.stride, mix=(order, alpha), mode=mode)))
        for name, kw in rows:
            bpb = run(val, **kw)[0]
            base = bpb if base is None else base
            print(f"| {name} | {bpb:.4f} | {bpb - base:+.4f} |")


if __name__ == "__main__":
    main()
