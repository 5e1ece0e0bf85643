"""What verifying complete.json's sha256 costs (minigpt2.fileio.checksum_problems).

    python bench/bench_checksums.py            # the bundled base, and a GPT-2-small-sized file
    python bench/bench_checksums.py --mb 0     # the bundled base only

Times sha256 of weights/base/model.safetensors (20.5 MB) and of a random file of GPT-2 small's
model.safetensors size (548 MB), each read once first so the page cache holds it (a load right
after a save, or the second of two); and load_pretrained(weights/base) with and without a
complete.json beside it (copies in a temporary directory), best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt2 import fileio, load_pretrained  # noqa: E402


def best(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=548, help="size of the large file (0: skip it)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    base = ROOT / "weights" / "base" / "model.safetensors"
    rows = [("weights/base/model.safetensors", base.stat().st_size, best(lambda: fileio.sha256_file(base), args.repeats))]
    with tempfile.TemporaryDirectory() as tmp:
        if args.mb:
            big = Path(tmp) / "big.safetensors"
            with open(big, "wb") as f:
                for _ in range(args.mb):
                    f.write(os.urandom(1 << 20))
            fileio.sha256_file(big)  # into the page cache
            rows.append((f"{args.mb} MB (GPT-2 small's size)", big.stat().st_size,
                         best(lambda: fileio.sha256_file(big), args.repeats)))
            big.unlink()
        for name, size, t in rows:
            print(f"sha256 {name}: {size / 1e6:.1f} MB in {t:.3f} s ({size / 1e6 / t:.0f} MB/s)")
        plain, sealed = Path(tmp) / "plain", Path(tmp) / "sealed"
        for d in (plain, sealed):
            shutil.copytree(ROOT / "weights" / "base", d)
        fileio.seal(sealed)
        load_pretrained(plain)  # warm up: imports, page cache
        t_plain = best(lambda: load_pretrained(plain), args.repeats)
        t_sealed = best(lambda: load_pretrained(sealed), args.repeats)
        print(f"load_pretrained(weights/base): {t_plain:.3f} s without complete.json, {t_sealed:.3f} s with "
              f"(+{t_sealed - t_plain:.3f} s)")


if __name__ == "__main__":
    main()
