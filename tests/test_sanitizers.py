"""The simulation and fuzz workloads under AddressSanitizer + UBSan.

Builds a second copy of the C core with ``GROUPCOMM_SANITIZE=1`` into a temporary
directory and runs schedules in a subprocess that loads it (via
``GROUPCOMM_RING_LIBRARY``) with libasan preloaded.  Any out-of-bounds access,
use-after-free or undefined behaviour aborts the subprocess and fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, sys.argv[1])
    from groupcomm.core.native import lib
    from groupcomm.core.ring import Ring, RingConfig
    from tests.simrun import run_schedule
    from tests.test_checker_teeth import random_plan
    assert "GROUPCOMM_RING_LIBRARY" in __import__("os").environ
    config = RingConfig(token_timeout=0.2, join=0.02, merge=0.05)
    for seed in range(25):
        rng = random.Random(seed)
        n = rng.randint(2, 8)
        run_schedule(n, seed, random_plan(rng, n), config)
    # garbage and truncated packets into a live ring
    rng = random.Random(7)
    ring = Ring(1, config)
    ring.start(0)
    for i in range(20000):
        ring.receive(i, bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        ring.receive(i, b"GC\\x01" + bytes([rng.randint(0, 8)]) + bytes(8) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        ring.tick(i)
        ring.take()
    print("sanitized workload ok")
    """
)


def _libasan() -> str | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _build_sanitized(tmp: Path) -> Path:
    env = dict(os.environ, GROUPCOMM_SANITIZE="1")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'groupcomm' / 'core')!r})
        import build as ring_build
        b = ring_build.make_builder("_ring_cffi", absolute_paths=True)
        print(b.compile(tmpdir={str(tmp)!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def run_sanitized(tmp_path, workload: str, marker: str, timeout: float = 600) -> None:
    """Run ``workload`` (a script) on an ASan/UBSan build of the C code; it must print ``marker``."""
    assert _libasan() is not None, "this test needs gcc with libasan (apt install gcc)"
    so = _build_sanitized(tmp_path)
    script = tmp_path / "workload.py"
    script.write_text(workload)
    env = dict(
        os.environ,
        GROUPCOMM_RING_LIBRARY=str(so),
        LD_PRELOAD=_libasan() or "",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, str(script), str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-6000:])
    assert marker in out.stdout


def test_simulation_and_garbage_under_asan_and_ubsan(tmp_path):
    run_sanitized(tmp_path, WORKLOAD, "sanitized workload ok")


# The fuzz corpus (tests/fuzz/corpus: valid datagrams captured from live clusters, and the
# inputs that once crashed a target) through the C parser, in a gathering ring, a formed
# ring and a member with every layer; then each seed cut short, and with bytes flipped, so
# that the parser's length and range checks are hit by packets that pass the first ones.
CORPUS_WORKLOAD = textwrap.dedent(
    """
    import random, sys
    sys.path.insert(0, sys.argv[1])
    assert "GROUPCOMM_RING_LIBRARY" in __import__("os").environ
    from tests.fuzz.run import CORPUS, inputs
    from tests.fuzz.targets import SEP, TARGETS
    rng = random.Random(1)
    fed = 0
    for target in ("ring", "ring-operational", "member"):
        one = TARGETS[target]()
        seeds = [p.read_bytes() for p in inputs([str(CORPUS / target)])]
        variants = []
        for seed in seeds:
            variants.append(seed)
            cuts = sorted({1, 3, 4, 8, 12, len(seed) // 2, len(seed) - 1} & set(range(len(seed))))
            variants.append(SEP.join(seed[:n] for n in cuts))
            flipped = bytearray(seed)
            for _ in range(4):
                if flipped:
                    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            variants.append(bytes(flipped))
        for data in variants:
            one(data)
            fed += 1
    print("sanitized corpus ok", fed)
    """
)


def test_fuzz_corpus_through_the_ring_parser_under_asan_and_ubsan(tmp_path):
    run_sanitized(tmp_path, CORPUS_WORKLOAD, "sanitized corpus ok", timeout=300)
