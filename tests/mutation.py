"""Mutation testing of one module with mutmut, in a scratch copy of the repository.

    pip install -e '.[test,mutation]'
    python tests/mutation.py groupcomm/layers/rpc.py tests/test_rpc.py tests/test_spaces_sim.py
    python tests/mutation.py --diffs /tmp/frag.diff groupcomm/layers/frag.py tests/test_frag.py

mutmut rewrites the module into many mutants and runs the given tests against
each; a mutant the tests do not fail is a gap (or an equivalent change).  The
copy keeps the working tree clean (mutmut writes a ``mutants/`` folder) and
carries the compiled core along.  Hypothesis tests run under the short
``mutation`` profile (tests/conftest.py) unless HYPOTHESIS_PROFILE says otherwise.
Prints the survivors and the kill rate.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scratch_copy(where: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    for built in (ROOT / "groupcomm" / "core").glob("_ring_cffi*.so"):
        shutil.copy2(built, where / "groupcomm" / "core" / built.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="the module to mutate, e.g. groupcomm/layers/rpc.py")
    parser.add_argument("tests", nargs="+", help="test files that should kill its mutants")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--diffs", metavar="FILE", help="write the diff of every mutant not killed to FILE")
    parser.add_argument("--only", metavar="GLOB", action="append", default=[],
                        help="only the mutants whose names match (mutmut's names, e.g. '*SpaceLayer*_sync*'); "
                             "repeatable; bounds a run on a large module")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="groupcomm-mutation-") as tmp:
        where = Path(tmp)
        scratch_copy(where)
        with open(where / "pyproject.toml", "a") as f:
            f.write("\n[tool.mutmut]\n"
                    f"source_paths = [{args.module!r}]\n"
                    f"pytest_add_cli_args_test_selection = {args.tests!r}\n"
                    'also_copy = ["groupcomm", "protocols", "tests"]\n')
        env = {**os.environ, "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "mutation")}
        run = subprocess.run(["mutmut", "run", "--max-children", str(args.jobs), *args.only], cwd=where, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if run.returncode:                   # e.g. the tests fail on the unmutated code
            print(run.stderr[-3000:], file=sys.stderr)
            print(f"mutmut run failed (exit {run.returncode})", file=sys.stderr)
            return 1
        results = subprocess.run(["mutmut", "results", "--all", "true"], cwd=where,
                                 capture_output=True, text=True, check=False).stdout
        verdicts = re.findall(r"^\s*(\S+): (\w[\w ]*)$", results, re.MULTILINE)
        if args.only:
            verdicts = [(n, v) for n, v in verdicts if any(fnmatch.fnmatchcase(n, g) for g in args.only)]
        if args.diffs:
            with open(args.diffs, "w") as out:
                for name, verdict in verdicts:
                    if verdict != "killed":
                        shown = subprocess.run(["mutmut", "show", name], cwd=where, capture_output=True, text=True,
                                               check=False)
                        out.write(f"# {verdict}: {name}\n{shown.stdout}\n")
    killed = sum(1 for _, v in verdicts if v == "killed")
    for name, verdict in verdicts:
        if verdict != "killed":
            print(f"{verdict:>10}  {name}")
    total = len(verdicts)
    print(f"{args.module}: {killed}/{total} mutants killed ({100 * killed / max(total, 1):.1f}%)")
    return 0 if total else 1


if __name__ == "__main__":
    sys.exit(main())
