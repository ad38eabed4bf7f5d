"""How long an image folder takes to read: the first (decoding) read and cached reads, both splits.

    python bench/imagefolder_read.py data/c10 --repeats 5 --out bench/results/imagefolder_read_cifar10_jpeg_q75.json

ROOT is an image folder (ROOT/train/<class>/*, ROOT/test/<class>/*), e.g. the CIFAR-10 JPEG q75 copy (60,000 JPEG
files; docs/DATA.md says where to get it).
The script points FLATROBUST_CACHE at a fresh temporary folder (removed at the end unless --keep-cache), so
the first read of each split decodes every image and writes the cache; then it reads both splits from the
cache --repeats times (median). Every read is `flatrobust.data.load_split`, what `flatrobust train` calls:
list the folder and read each file's size and mtime (the cache key), decode or read the cached uint8
arrays, compute the training split's normalization statistics, convert to float32 in [0, 1]. The
metadata pass alone (listing + key) is timed as well, --repeats times per split. Wall and process CPU
time (all threads; steadier than wall time on a shared machine) are both recorded.

--thread-check N decodes the first N training files on 1 and on 2 threads, alternating, --repeats rounds,
and reports the median wall time of each (does a thread pool pay here?).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from flatrobust.data import DataSpec, load_split  # noqa: E402
from flatrobust.data import imagefolder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the image folder (train/ and test/ or val/ inside)")
    p.add_argument("--image-size", type=int, default=0, help="data.image_size (default 0: keep)")
    p.add_argument("--repeats", type=int, default=5, help="cached reads of each split (median reported)")
    p.add_argument("--decode-threads", type=int, default=None, help="decoding threads (default: the library's DECODE_THREADS)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--cache-parent", default=None, help="where the fresh cache folder is made (default: the system temp folder)")
    p.add_argument("--keep-cache", action="store_true", help="do not remove the cache folder at the end")
    p.add_argument("--thread-check", type=int, default=0, metavar="N", help="also time decoding N files on 1 thread vs the default")
    p.add_argument("--out", default=None, help="write every number and the environment as JSON")
    args = p.parse_args()
    common.set_threads(args.threads)
    imagefolder.DECODE_THREADS = args.decode_threads or imagefolder.DECODE_THREADS
    cache = Path(tempfile.mkdtemp(prefix="flatrobust-cache-", dir=args.cache_parent))
    os.environ["FLATROBUST_CACHE"] = str(cache)
    spec = DataSpec("imagefolder", args.root, image_size=args.image_size)
    threads = imagefolder.DECODE_THREADS
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        train = load_split(spec, "train")
        first_train, first_train_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        test = load_split(spec, "test", like=train.info)
        first_test, first_test_cpu = time.perf_counter() - t0, time.process_time() - c0
        cache_bytes = sum(f.stat().st_size for f in (cache / "imagefolder").glob("*.npz"))
        print(f"first read: train {first_train:.2f} s ({len(train)} images), test {first_test:.2f} s ({len(test)} images)",
              file=sys.stderr)
        cached = {"train": [], "test": []}
        cached_cpu = {"train": [], "test": []}
        metadata = {"train": [], "test": []}
        for r in range(args.repeats):
            for split in ("train", "test"):
                t0, c0 = time.perf_counter(), time.process_time()
                again = load_split(spec, split, like=None if split == "train" else train.info)
                cached[split].append(time.perf_counter() - t0)
                cached_cpu[split].append(time.process_time() - c0)
                assert torch.equal(again.x, (train if split == "train" else test).x)
                t0 = time.perf_counter()
                listing = imagefolder.list_images(imagefolder.split_dir(Path(args.root), split))
                imagefolder._cache_key(listing, args.image_size)
                metadata[split].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats}: cached train {cached['train'][-1]:.2f} s, test {cached['test'][-1]:.2f} s",
                  file=sys.stderr)
        threads_s: dict[str, list[float]] = {"1": [], "2": []}
        if args.thread_check:
            files = imagefolder.list_images(imagefolder.split_dir(Path(args.root), "train")).paths()[:args.thread_check]
            for r in range(args.repeats):
                for n in (1, 2) if r % 2 == 0 else (2, 1):
                    t0 = time.perf_counter()
                    imagefolder.decode_images(files, args.image_size, threads=n)
                    threads_s[str(n)].append(time.perf_counter() - t0)
            print("decoding threads: " + ", ".join(f"{n}: {common.median(v):.2f} s" for n, v in threads_s.items()), file=sys.stderr)
    finally:
        if not args.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    env = common.environment(torch.device("cpu"))
    info = train.info
    result = {
        "root": args.root, "image_size": args.image_size, "decode_threads": threads, "repeats": args.repeats,
        "images": {"train": len(train), "test": len(test)}, "shape": [info.in_channels, info.image_size, info.image_size],
        "first_read_s": {"train": first_train, "test": first_test},
        "first_read_cpu_s": {"train": first_train_cpu, "test": first_test_cpu},
        "cached_read_s": cached, "cached_read_median_s": {k: common.median(v) for k, v in cached.items()},
        "cached_read_cpu_s": cached_cpu, "cached_read_cpu_median_s": {k: common.median(v) for k, v in cached_cpu.items()},
        "thread_check": {"files": args.thread_check, "wall_s": threads_s,
                         "median_s": {n: common.median(v) for n, v in threads_s.items() if v}} if args.thread_check else None,
        "metadata_pass_s": metadata, "metadata_pass_median_s": {k: common.median(v) for k, v in metadata.items()},
        "cache_bytes": cache_bytes, "info": info.to_dict(), "environment": env,
    }
    print("\n" + markdown(result))
    common.write_json(args.out, result)


def markdown(result: dict) -> str:
    """The Markdown that docs/DATA.md quotes (a test checks it against bench/results)."""
    env = result["environment"]
    load = " / ".join(f"{v:.1f}" for v in env["load_average_1_5_15min"] or [])
    head = (f"`{env['command']}` ({env['date'][:10]}, {env['cpu']}, {env['logical_cpus']} logical CPUs, load average "
            f"{load} at the end, {result['decode_threads']} decoding thread(s), cache {result['cache_bytes'] / 2**20:.0f} MiB):")
    rows = [[s, str(result["images"][s]), f"{result['first_read_s'][s]:.1f} ({result['first_read_cpu_s'][s]:.1f})",
             f"{result['cached_read_median_s'][s]:.1f} ({result['cached_read_cpu_median_s'][s]:.1f})",
             f"{result['metadata_pass_median_s'][s]:.1f}"] for s in ("train", "test")]
    n = result["repeats"]
    out = head + "\n\n" + common.markdown_table(
        ["split", "images", "first read (decode + write cache): wall (CPU) s", f"cached read: wall (CPU) s, median of {n}",
         "of which listing + key, wall s"], rows)
    check = result.get("thread_check")
    if check:
        med = check["median_s"]
        out += (f"\n\nDecoding {check['files']} training files, median of {n}: "
                + ", ".join(f"{k} thread{'s' if k != '1' else ''} {v:.2f} s" for k, v in med.items()) + ".")
    return out


if __name__ == "__main__":
    main()
