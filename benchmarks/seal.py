"""Cost of the seal (groupcomm/_seal.c) per datagram, through the Python binding.

    python benchmarks/seal.py [--seconds 1]

Prints, for datagrams of 100 B, 1 KiB, 1400 B and 64000 B: microseconds per
seal and per open, and MB/s; and the cost of deriving a subkey (what a forged
claim can make a member pay, up to CRYPTO derive_budget times a second).
Python's own call overhead is in the figures; the C pump calls the same
functions without it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from groupcomm.config.keys import new_key_file  # noqa: E402
from groupcomm.core.seal import Seal  # noqa: E402


def per_call(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(200):
            fn()
        n += 200
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    keys = new_key_file()
    for size in (100, 1024, 1400, 64000):
        sender, receiver = Seal(1, 1, 1, keys), Seal(1, 2, 2, keys)
        packet = b"GC\x02\x00" + bytes(4) + (1).to_bytes(4, "big") + bytes(size - 12)
        seal_us = per_call(lambda: sender.seal(packet), args.seconds)
        sealed = [sender.seal(packet) for _ in range(int(args.seconds * 1e6 / max(seal_us, 0.1)) + 1000)]
        it = iter(sealed)
        open_us = per_call(lambda: receiver.open(next(it)), args.seconds * 0.5)
        print(f"{size:>6} B: seal {seal_us:6.2f} µs, open {open_us:6.2f} µs  "
              f"({size / seal_us:,.0f} / {size / open_us:,.0f} MB/s)")
    # A claim never seen (a new incarnation each time): one HKDF derivation + a failed open.
    forger = Seal(1, 3, 1, new_key_file())
    receiver = Seal(1, 2, 2, keys, derive_budget=1 << 20)
    claims = [Seal(1, 3, i, forger_keys).seal(b"x" * 100) for i, forger_keys in
              ((i, new_key_file()) for i in range(1, 3001))]
    t0 = time.perf_counter()
    for c in claims:
        receiver.open(c)
    print(f"a forged claim (subkey derivation + failed open): {(time.perf_counter() - t0) / len(claims) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
