"""Run one fuzz target under atheris, or replay files through it.

    python -m tests.fuzz --list
    python -m tests.fuzz TARGET [CORPUS_DIR ...] [-libFuzzer_flag=value ...]
    python -m tests.fuzz TARGET --replay FILE_OR_DIR ...

Without a corpus directory the fuzzer starts from the committed seeds in
``tests/fuzz/corpus/TARGET`` and writes the inputs it finds into a scratch
directory (the committed corpus is only read).  The dictionary
``tests/fuzz/fuzz.dict`` (magics, the packet separator) is passed unless
``-dict=`` is given.  A Python exception escaping the target is a crash:
atheris prints it and saves the input as ``crash-<sha1>`` (``-artifact_prefix=``).

The groupcomm modules are instrumented for Python coverage.  The C ring core
runs uninstrumented (its coverage would need clang's ``-fsanitize=fuzzer-no-link``);
the ASan/UBSan test replays the corpus through it instead.

``--replay`` runs the target on each file without atheris (no instrumentation
needed) and exits 1 if any input raised: the corpus as a regression suite.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
DICTIONARY = HERE / "fuzz.dict"
MAX_LEN = 8192
"""Longest input (bytes): a few datagrams, or a message's fragments; no seed is longer."""
DEFAULT_FLAGS = ("-timeout=10", "-rss_limit_mb=1536", f"-max_len={MAX_LEN}")
"""Per input at most 10 s and the process at most 1.5 GB (a hang or unbounded growth is a finding)."""


def inputs(paths: list[str]) -> list[Path]:
    """Every file under ``paths`` (files or directories), sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def replay(target: str, paths: list[str]) -> int:
    """Run ``target`` on every file under ``paths``; the number of inputs that raised."""
    from tests.fuzz.targets import TARGETS

    one = TARGETS[target]()
    failed = 0
    files = inputs(paths or [str(CORPUS / target)])
    for path in files:
        try:
            one(path.read_bytes())
        except Exception:                    # noqa: BLE001 - any exception is a finding
            failed += 1
            print(f"{target}: {path} raised:", file=sys.stderr)
            traceback.print_exc()
    print(f"{target}: replayed {len(files)} inputs, {failed} raised")
    return failed


def fuzz(target: str, args: list[str]) -> None:
    """Fuzz ``target`` with libFuzzer ``args`` (never returns; libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["groupcomm"]):
        from tests.fuzz.targets import TARGETS

    one = TARGETS[target]()
    if not any(not a.startswith("-") for a in args):
        scratch = tempfile.mkdtemp(prefix=f"groupcomm-fuzz-{target}-")
        args = [scratch, str(CORPUS / target), *args]
        print(f"new inputs go to {scratch}", file=sys.stderr)
    if not any(a.startswith("-dict=") for a in args):
        args.append(f"-dict={DICTIONARY}")
    for flag in DEFAULT_FLAGS:
        if not any(a.startswith(flag.split("=")[0] + "=") for a in args):
            args.append(flag)
    atheris.Setup([sys.argv[0], *args], one)
    atheris.Fuzz()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--list":
        from tests.fuzz.targets import TARGETS

        for name, make in TARGETS.items():
            print(f"{name:18} {(make.__doc__ or '').strip().splitlines()[0]}")
        return 0
    target, rest = argv[0], argv[1:]
    # A member logs datagrams of another protocol version once per peer; every input builds
    # a new member, so that would be a line per input.
    logging.disable(logging.WARNING)
    os.environ.setdefault("GROUPCOMM_STATE_DIR", tempfile.mkdtemp(prefix="groupcomm-fuzz-state-"))
    if rest[:1] == ["--replay"]:
        return 1 if replay(target, rest[1:]) else 0
    fuzz(target, rest)
    return 0
