"""The memory check's estimate against the measured peak of real runs (one subprocess each, tiny shapes with
each counted piece made large enough to show): never below the peak, at most 3x it."""
import pytest

from conftest import load_script

B = load_script("tests/bench_memory.py")


def _check(data, tmp_path, over: dict, ranks: int = 1):
    env = B.tiny(data["data_path"], data["tokenizer"], str(tmp_path), **{"VOCAB_SIZE": data["vocab_size"], **over})
    measured = B.measure(env, ranks)
    peak = max(measured["mlx_peak"], measured["rss_run"])
    estimate = B.estimate(env, ranks)
    mib = {k: f"{v / 2**20:.0f} MiB" for k, v in dict(measured, estimate=estimate).items()}
    assert peak <= estimate <= 3 * peak, mib


@pytest.mark.parametrize("piece", list(B.PIECES))
def test_memory_estimate_bounds_the_measured_peak(data, tmp_path, piece):
    _check(data, tmp_path, B.PIECES[piece])


@pytest.mark.skipif(not B.LAUNCH.exists(), reason="mlx.launch is not installed beside this python")
def test_memory_estimate_counts_every_rank_on_this_host(data, tmp_path):
    """2 ranks on one host: both processes' peaks, summed, against the estimate the check uses for them."""
    _check(data, tmp_path, {}, ranks=2)
