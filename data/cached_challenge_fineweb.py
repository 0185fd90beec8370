#!/usr/bin/env python3
"""Download the official Parameter Golf data (pre-tokenized FineWeb shards + tokenizer).

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80

Source: the Hugging Face dataset repo willdepueoai/parameter-golf; the 8192-piece export
the leaderboard's sp8192 records train on (and the 4096 one) lives in kevclark/parameter-golf,
so --variant sp8192 (sp4096) fetches from there (the environment variable
MATCHED_FINEWEB_REPO_ID overrides the repo for any variant). Local layout, identical to the challenge's:

    <data-dir>/manifest.json
    <data-dir>/datasets/fineweb10B_spN/fineweb_{val,train}_NNNNNN.bin
    <data-dir>/tokenizers/fineweb_N_bpe.{model,vocab}

<data-dir> defaults to the folder holding this script, so running it from the repo root
fills ./data/. All validation shards are always fetched (val_bpb is scored on all of
them); --train-shards picks how many of the ~100M-token train shards (0 = none).
Files already present and valid (shard header + exact size) are skipped, so an
interrupted run (Ctrl-C included: partial files are removed) can simply be restarted.
The local manifest.json is refreshed from the repo on each run and keeps the entries of
the variants other repos gave, so a manifest written for one variant never hides another.

Without network the script fails within seconds: before its first download it opens one
TCP connection to the Hub (or to the proxy that would carry the request), and when that
fails it names the offline alternative, data/build_shards.py, instead of letting
huggingface_hub retry for minutes. Folders it created are removed again on failure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import socket
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_REPO = "willdepueoai/parameter-golf"
VARIANT_REPOS = {"sp4096": "kevclark/parameter-golf",  # exports outside the default repo: the sp4096 and
                 "sp8192": "kevclark/parameter-golf"}  # sp8192 records fetched theirs there
REMOTE_ROOT = "datasets"  # every challenge file lives under this folder of the repo
STAGING = ".hf_download"  # hf_hub_download's working folder, next to the final files
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024
PROBE_TIMEOUT = 5.0  # seconds for the connectivity probe (DNS + TCP connect), all addresses together
SCRIPT_DIR = Path(__file__).resolve().parent
SHARED_SAMPLE = SCRIPT_DIR.parent.parent / "shared" / "fineweb_sample"  # ../shared next to the repo


class HubUnreachable(ConnectionError):
    """No connection to the Hugging Face Hub at all (offline, DNS failure, firewall)."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"cannot reach the Hugging Face Hub at {endpoint} ({reason})")
        self.endpoint, self.reason = endpoint, reason


def repo_for(variant: str) -> str:
    """The dataset repo holding ``variant``: MATCHED_FINEWEB_REPO_ID when set, else the repo known to hold it."""
    return os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS.get(variant, DEFAULT_REPO)


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT.rstrip("/")
    except (ImportError, AttributeError):
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(endpoint: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why ``endpoint`` cannot be reached (a short reason), or None when a TCP connection to
    it, or to the proxy that would carry the request, opens within ``timeout`` seconds.

    huggingface_hub retries an unreachable host with backoff (about 25 s per file, more
    with our own retries), so a dead network is detected here first. DNS lookups ignore
    socket timeouts, so the probe runs in a daemon thread that is abandoned on timeout."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(endpoint)
    host, scheme = url.hostname, url.scheme or "https"
    if not host:
        return f"invalid endpoint URL {endpoint!r}"
    port, via = url.port or (443 if scheme == "https" else 80), ""
    proxy = urllib.request.getproxies().get(scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            default = {"https": 443, "socks5": 1080, "socks5h": 1080, "socks4": 1080}.get(purl.scheme, 80)
            host, port, via = purl.hostname, purl.port or default, " via proxy"
    result: list[str | None] = []

    def attempt():
        deadline, err = time.monotonic() + timeout, None
        try:
            addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            result.append(f"cannot resolve {host}{via}: {e.strerror or e}")
            return
        for family, kind, proto, _, addr in addrs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                with socket.socket(family, kind, proto) as s:
                    s.settimeout(left)
                    s.connect(addr)
                result.append(None)
                return
            except OSError as e:
                err = e
        reason = "timed out" if err is None or isinstance(err, socket.timeout) else (err.strerror or str(err))
        result.append(f"cannot connect to {host}:{port}{via}: {reason}")

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"no answer from {host}{via} within {timeout:g} s"


_probed: dict[str, str | None] = {}  # endpoint -> probe_hub's answer, cleared by each download()


def require_hub(force: bool = False) -> None:
    """Raise HubUnreachable unless the Hub answers (probed once per download() unless forced)."""
    endpoint = hub_endpoint()
    if force or endpoint not in _probed:
        _probed[endpoint] = probe_hub(endpoint)
    if _probed[endpoint] is not None:
        raise HubUnreachable(endpoint, _probed[endpoint])


def fetch(remote_path: str, dest: Path, repo_id: str = DEFAULT_REPO) -> None:
    """Download one file of the dataset repo ``repo_id`` to ``dest``: the script's only network access.

    Raises FileNotFoundError when the repo has no such file (used to discover how many
    val shards exist), HubUnreachable when there is no connection to the Hub at all (not
    worth retrying). Tests replace this function with a local stand-in. The caller
    passes a temporary ``dest`` and renames it only after validation."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        sys.exit("huggingface_hub is not installed: pip install huggingface_hub")
    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    require_hub()
    # local_dir on the same filesystem: no second copy in ~/.cache, and a cheap rename.
    staging = Path(dest).parent / STAGING
    try:
        got = Path(hf_hub_download(repo_id, remote_path, repo_type="dataset", local_dir=staging))
    except EntryNotFoundError as e:
        if not isinstance(e, LocalEntryNotFoundError):  # that subclass means "offline", not "no such file"
            raise FileNotFoundError(f"{repo_id} has no file {remote_path}") from e
        require_hub(force=True)  # the connection went away during the run: stop now, no retries
        raise ConnectionError(f"cannot reach the Hugging Face Hub for {remote_path}: {e}") from e
    except Exception:
        require_hub(force=True)
        raise
    if got.is_symlink():  # old huggingface_hub versions may link into their cache
        shutil.copyfile(got.resolve(), dest)
    else:
        os.replace(got, dest)


def shard_tokens(path: Path) -> int | None:
    """Token count of a valid challenge shard, or None when it is missing, truncated or
    not a shard (such a file is then downloaded again)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic, version, count = struct.unpack("<3i", f.read(12))
    except (OSError, struct.error):
        return None
    ok = magic == MAGIC and version == VERSION and count >= 0 and size == HEADER_BYTES + 2 * count
    return count if ok else None


def nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def shard_counts(manifest, folder: str) -> tuple[int | None, int | None]:
    """(train, val) shard counts for ``folder`` from the manifest, or None where unknown.

    Reads the known schema ({"datasets": [{"name", "stats": {"files_train", "files_val"}}]})
    and otherwise counts shard file names mentioned anywhere in the JSON, so a changed
    schema degrades to probing instead of failing."""
    counts = {"train": None, "val": None}
    try:
        entry = next(d for d in manifest["datasets"] if d.get("name") == folder)
        counts = {s: int(entry["stats"][f"files_{s}"]) for s in counts}
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError):
        pattern = re.compile(rf"{re.escape(folder)}/fineweb_(train|val)_(\d{{6}})\.bin")
        stack = [manifest]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack += list(x.keys()) + list(x.values())
            elif isinstance(x, list):
                stack += x
            elif isinstance(x, str) and (m := pattern.search(x)):
                counts[m[1]] = max(counts[m[1]] or 0, int(m[2]) + 1)
    return counts["train"], counts["val"]


class Downloader:
    """Fetches files into the challenge layout: skip valid ones, write atomically, retry."""

    def __init__(self, retries: int = 3, log=print, repo_id: str = DEFAULT_REPO):
        self.retries, self.log = retries, log
        self.repo_id = repo_id
        self.downloaded: list[str] = []
        self.skipped: list[str] = []
        self.created: list[Path] = []  # folders this run created, parents first

    def makedirs(self, path: Path) -> None:
        """mkdir -p that remembers which folders it created (see remove_empty_created)."""
        missing, d = [], path
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            self.created.append(d)
        path.mkdir(parents=True, exist_ok=True)  # FileExistsError when a file is in the way

    def remove_empty_created(self) -> None:
        """Remove the folders this run created that are still empty, deepest first; folders
        that existed before the run are never touched."""
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:  # not empty (or already gone)
                pass

    def get(self, remote: str, local: Path, valid, label: str) -> None:
        if valid(local):
            self.skipped.append(str(local))
            self.log(f"{label} {local.name}: present ({local.stat().st_size:,} bytes), skipped")
            return
        self.makedirs(local.parent)
        tmp = local.with_name(f"{local.name}.part{os.getpid()}")
        t0 = time.time()
        try:
            for attempt in range(1, self.retries + 1):
                try:
                    fetch(remote, tmp, self.repo_id)
                    break
                except (FileNotFoundError, HubUnreachable):
                    raise
                except Exception as e:  # network hiccup: retry with backoff
                    tmp.unlink(missing_ok=True)
                    if attempt == self.retries:
                        raise RuntimeError(f"failed to download {remote} after {attempt} tries: {e!r}") from e
                    self.log(f"{label} {local.name}: attempt {attempt} failed ({e!r}), retrying")
                    time.sleep(min(2 ** attempt, 30))
            if not valid(tmp):
                raise RuntimeError(f"downloaded {remote} is invalid (empty file, or bad shard header or size); "
                                   "run again to re-download")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        size, dt = local.stat().st_size, time.time() - t0
        self.downloaded.append(str(local))
        self.log(f"{label} {local.name}: downloaded {size:,} bytes in {dt:.1f}s ({size / 1e6 / max(dt, 1e-6):.1f} MB/s)")


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_manifests(new, old):
    """``new`` plus the named entries ("datasets", "tokenizers") of ``old`` that ``new`` lacks.

    One local manifest.json serves every variant, but each repo's manifest lists only its own
    exports (the default repo's lacks sp8192): replacing the file outright would make the
    variant fetched earlier from another repo unknown again, and an offline rerun of it fail."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return new
    for key in ("datasets", "tokenizers"):
        entries, kept = new.get(key), old.get(key)
        if not isinstance(entries, list) or not isinstance(kept, list):
            continue
        names = {e.get("name") for e in entries if isinstance(e, dict)}
        entries += [e for e in kept if isinstance(e, dict) and e.get("name") not in names]
    return new


def load_manifest(data_dir: Path, repo_id: str = DEFAULT_REPO, log=print, makedirs=None):
    """Refresh <data_dir>/manifest.json from ``repo_id`` (atomically, so a failed fetch keeps the
    old copy; merged with it, see merge_manifests); fall back to the local copy, or None: the
    manifest only tells how many shards exist. Without a connection to the Hub and without a
    local copy nothing can be done: the HubUnreachable error is raised."""
    path = data_dir / "manifest.json"
    tmp = path.with_name(f"manifest.json.part{os.getpid()}")
    try:  # the finally also runs on Ctrl-C: no partial manifest is left
        try:
            (makedirs or (lambda d: d.mkdir(parents=True, exist_ok=True)))(data_dir)
            fetch(f"{REMOTE_ROOT}/manifest.json", tmp, repo_id)
            merged = merge_manifests(read_json(tmp), read_json(path))
            if merged is not None:  # JSON: written back merged; anything else: kept as fetched
                tmp.write_text(json.dumps(merged, indent=2), encoding="utf-8")
            os.replace(tmp, path)
        except HubUnreachable as e:
            if not path.is_file():
                raise
            log(f"[manifest] {e}; using the local copy (files already present need no network)")
        except Exception as e:  # any other failure: the manifest is only a hint
            log(f"[manifest] could not fetch manifest.json ({e}); " +
                ("using the local copy" if path.is_file() else "falling back to probing file names"))
        return read_json(path)
    finally:
        tmp.unlink(missing_ok=True)


def download(variant: str = "sp1024", train_shards: int = 80, data_dir=None, retries: int = 3, log=print) -> dict:
    """Download tokenizer, all val shards and ``train_shards`` train shards; return a summary."""
    m = re.fullmatch(r"sp(\d+)", variant)
    if not m:
        raise ValueError(f"unsupported variant {variant!r}; expected sp<VOCAB>, e.g. sp1024")
    if train_shards < 0:
        raise ValueError("--train-shards must be >= 0")
    vocab = int(m[1])
    folder, tok = f"fineweb10B_{variant}", f"fineweb_{vocab}_bpe"
    data_dir = Path(data_dir) if data_dir else SCRIPT_DIR
    ds_dir, tok_dir = data_dir / "datasets" / folder, data_dir / "tokenizers"
    remote_ds = f"{REMOTE_ROOT}/datasets/{folder}"
    repo = repo_for(variant)
    dl = Downloader(retries, log, repo)
    _probed.clear()  # probe the Hub afresh on this run's first download

    try:
        n_train, n_val = shard_counts(load_manifest(data_dir, repo, log, dl.makedirs), folder)
        log(f"repo {repo} variant {variant} -> {ds_dir}")
        if n_train is not None and train_shards > n_train:
            log(f"warning: {folder} has only {n_train} train shards; downloading {n_train}")
            train_shards = n_train
        total = "?" if n_val is None else str(2 + n_val + train_shards)
        done = itertools.count(1)
        label = lambda: f"[{next(done)}/{total}]"  # noqa: E731

        for ext in ("model", "vocab"):
            dl.get(f"{REMOTE_ROOT}/tokenizers/{tok}.{ext}", tok_dir / f"{tok}.{ext}", nonempty, label())
        val_count = 0
        for i in (range(n_val) if n_val is not None else itertools.count()):
            name = f"fineweb_val_{i:06d}.bin"
            try:
                dl.get(f"{remote_ds}/{name}", ds_dir / name, shard_tokens, label())
            except FileNotFoundError:
                if n_val is not None or i == 0:
                    raise
                break  # probing without a manifest: the first missing index ends the val split
            val_count += 1
        train_count = 0
        for i in range(train_shards):
            name = f"fineweb_train_{i:06d}.bin"
            try:
                dl.get(f"{remote_ds}/{name}", ds_dir / name, shard_tokens, label())
            except FileNotFoundError:
                if n_train is not None:
                    raise
                log(f"warning: {repo} has only {i} train shards for {folder}")
                break
            train_count += 1
    finally:  # also on errors and Ctrl-C: no staging folder, no empty folder of ours is left
        for d in (data_dir, tok_dir, ds_dir):
            shutil.rmtree(d / STAGING, ignore_errors=True)
        dl.remove_empty_created()
    log(f"done: {len(dl.downloaded)} downloaded, {len(dl.skipped)} already present; "
        f"{val_count} val + {train_count} train shards in {ds_dir}")
    return {"dataset_dir": str(ds_dir), "tokenizer": str(tok_dir / f"{tok}.model"),
            "val_shards": val_count, "train_shards": train_count,
            "downloaded": dl.downloaded, "skipped": dl.skipped}


def shown(path: Path) -> str:
    """``path`` for a message: relative to the working directory when it lies below it or
    below its parent (../shared/...), else absolute."""
    path = Path(path).resolve()
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return rel if not rel.startswith(os.path.join("..", "..")) else str(path)


def offline_message(err: HubUnreachable, variant: str, data_dir=None) -> str:
    """The one message printed when the Hub cannot be reached: what failed, and the offline path."""
    out = Path(data_dir or SCRIPT_DIR) / "datasets" / f"fineweb10B_{variant}"
    shipped = variant == "sp1024"  # the sample ships the 1024 tokenizer; another vocabulary is trained first
    train = "" if shipped else f"--train-tokenizer {variant[2:]} "
    lines = [f"error: {err}; the challenge data cannot be downloaded.",
             "Offline, build the shards from your own documents (JSONL or .txt) instead:",
             f"    python {shown(SCRIPT_DIR / 'build_shards.py')} --docs docs.jsonl {train}--tokenizer TOKENIZER.model "
             f"--out {shown(out)} --val-docs 50"]
    docs = SHARED_SAMPLE / "docs_200.jsonl"
    sample = f"; sample documents: {shown(docs)}" if docs.is_file() else ""
    if SHARED_SAMPLE.is_dir() and shipped:
        lines.append(f"The challenge tokenizer ships in {shown(SHARED_SAMPLE / 'fineweb_1024_bpe.model')} "
                     f"(use it as TOKENIZER.model, and as TOKENIZER_PATH for train_gpt_mlx.py){sample}.")
    elif not shipped:
        lines.append(f"--train-tokenizer writes TOKENIZER.model with the records' settings: use it as TOKENIZER_PATH, "
                     f"with VOCAB_SIZE={variant[2:]}, for train_gpt_mlx.py{sample}.")
    lines.append("With network access, check HF_ENDPOINT and the proxy settings (HTTPS_PROXY), then rerun.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sp1024", help="tokenizer variant spN (vocab N), default sp1024")
    p.add_argument("--train-shards", type=int, default=80,
                   help="number of train shards (~100M tokens each), default 80; 0 = val + tokenizer only")
    p.add_argument("--data-dir", default=None, help="root of the local layout (default: this script's folder)")
    p.add_argument("--retries", type=int, default=3, help="attempts per file on network errors (default 3)")
    a = p.parse_args(argv)
    try:
        return download(a.variant, a.train_shards, a.data_dir, max(1, a.retries),
                        log=lambda msg: print(msg, flush=True))
    except HubUnreachable as e:
        sys.exit(offline_message(e, a.variant, a.data_dir))
    except FileNotFoundError as e:  # the repo lacks a file: most often the variant is in another repo
        sys.exit(f"error: {e} (MATCHED_FINEWEB_REPO_ID names the dataset repo that holds --variant {a.variant})")
    except (ValueError, OSError, RuntimeError) as e:  # OSError: permissions, disk full
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted: partial files removed; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
