"""Device benchmark (prints numbers; not a test): the issues' GPU checks in one script, for a
session that has an accelerator (e.g. Linux + `pip install "mlx[cuda12]"`, or a Mac).

  1. the default 9x512 model trained for --steps steps: tokens/s and peak memory (train_gpt_mlx);
  2. the same step compiled vs uncompiled (tests/bench_train.py);
  3. sliding-window eval + n-gram mixer over --eval-tokens tokens, projected to the full
     62M-token validation split.

It needs no download: shards of random tokens are written to a temp folder (speed does not
depend on the text), and the tokenizer is ../shared/fineweb_sample's or --tokenizer.

    python tests/bench_device.py [--steps 200] [--eval-tokens 5000000]
    python tests/bench_device.py --steps 3 --eval-tokens 20000 --layers 1 --dim 64 --seq 128  # CPU smoke
"""
import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt_mlx as T  # noqa: E402
from bench_train import bench_train  # noqa: E402
from conftest import SAMPLE, load_script  # noqa: E402

FULL_VAL_TOKENS = 62_021_846  # approximate size of the challenge's validation split


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-tokens", type=int, default=5_000_000)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--micro-tokens", type=int, default=8192, help="MLX_MAX_MICROBATCH_TOKENS of the training run")
    p.add_argument("--skip-compile-bench", action="store_true")
    p.add_argument("--tokenizer", default=str(SAMPLE / "fineweb_1024_bpe.model"))
    a = p.parse_args()
    bs = load_script("data/build_shards.py")
    rng = np.random.default_rng(0)
    print(f"device:{mx.default_device()} mlx:{mx.__version__} layers={a.layers} dim={a.dim} seq={a.seq}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bs.write_shard(tmp / "fineweb_train_000000.bin", rng.integers(0, 1024, 20_000_000).astype(np.uint16))
        bs.write_shard(tmp / "fineweb_val_000000.bin", rng.integers(0, 1024, a.eval_tokens + 1).astype(np.uint16))
        heads = max(1, a.dim // 64)
        env = dict(DATA_PATH=str(tmp), TOKENIZER_PATH=a.tokenizer, OUT_DIR=str(tmp), RUN_ID="dev",
                   ITERATIONS=str(a.steps), MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS=str(64 * a.seq),
                   TRAIN_LOG_EVERY="50", NUM_LAYERS=str(a.layers), MODEL_DIM=str(a.dim), NUM_HEADS=str(heads),
                   NUM_KV_HEADS=str(max(1, heads // 2)), TRAIN_SEQ_LEN=str(a.seq),
                   MLX_MAX_MICROBATCH_TOKENS=str(a.micro_tokens), WARMUP_STEPS=str(min(20, max(a.steps, 1))),
                   TRAIN_BATCH_TOKENS=str(max(a.seq, 524_288 if a.dim >= 512 else 8 * a.seq)))
        t0 = time.time()
        if a.steps:  # 0 skips training: eval speed does not depend on the weights
            with contextlib.redirect_stdout(io.StringIO()):
                assert T.main(env) == 0, (tmp / "dev.txt").read_text()[-2000:]
            log = (tmp / "dev.txt").read_text()
            last = re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms step_avg:(\S+)ms tok_s:(\d+)",
                              log, re.M)[-1]
            peak = re.search(r"peak_memory:(\d+)MiB", log)[1]
            print(f"1. train {a.steps} steps x {env['TRAIN_BATCH_TOKENS']} tokens (microbatch {a.micro_tokens}): "
                  f"step_avg {last[2]} ms, {int(last[3]):,} tokens/s, {peak} MiB peak "
                  f"({time.time() - t0:.0f}s with warmup, evals and artifact)", flush=True)
        b = SimpleNamespace(vocab=1024, layers=a.layers, dim=a.dim, heads=heads, seq=a.seq, batch_tokens=8 * a.seq,
                            micro_tokens=8 * a.seq, steps=5, env=[])
        for compiled in () if a.skip_compile_bench else (True, False):
            tps, ms, mem, _ = bench_train(b, compiled)
            print(f"2. {'compiled' if compiled else 'uncompiled'} step ({8 * a.seq} tokens): {tps:,.0f} tokens/s, "
                  f"{ms:.1f} ms, {mem:.0f} MiB peak", flush=True)
        hp = T.Hyperparameters.from_env(env)
        model = T.GPT(T.ModelConfig.from_hparams(hp), hp.dtype())
        if a.steps:
            T.load_flat_into(model, T.read_artifact(str(tmp / "dev_model.int6.ptz"))[1])
        fns = T.Compiled(model, T.Optimizers(model, hp))
        tables = T.build_byte_tables(T.load_tokenizer(a.tokenizer), 1024)
        val = T.load_validation_tokens(str(tmp), 0, 1024)
        for mode in ("sliding", "sliding + mixer", "sliding + TTT lora (chunk 32768, 32 rows)"):
            mixer = T.BackoffNgramMixer(1024, 4, 0.7, "entropy") if "mixer" in mode else None
            fn, ttt = (fns.token_stats if mixer else fns.token_nll), None
            T.evaluate(fn, val[: 64 * a.seq + 1], a.seq, 64, tables, stride=a.stride)  # compile
            if "TTT" in mode:
                thp = T.Hyperparameters.from_env(dict(env, TTT_ENABLED="1", TTT_CHUNK="32768", TTT_BATCH_SEQS="32"))
                ttt = T.TestTimeTrainer(model, thp, a.seq, a.stride)
                ttt.prime(T.Compiled(model, T.Optimizers(model, thp), ttt=ttt).ttt_step)
            mx.reset_peak_memory()
            t = time.perf_counter()
            T.evaluate(fn, val, a.seq, 64, tables, stride=a.stride, mixer=mixer, ttt=ttt)
            dt = time.perf_counter() - t
            if ttt:
                ttt.close()
            print(f"3. {mode}, stride {a.stride}: {a.eval_tokens / dt:,.0f} tokens/s, "
                  f"{mx.get_peak_memory() / 2**20:.0f} MiB peak; full split projected "
                  f"{FULL_VAL_TOKENS / (a.eval_tokens / dt) / 60:.1f} min", flush=True)

if __name__ == "__main__":
    main()
