"""``groupcomm keygen`` and ``groupcomm key``: the cluster key file and its rotation.

``keygen PATH`` writes a new key file (mode 0600).  ``key`` changes one in
place, each step a separate command so that the file can be copied to every
member between steps (docs/security.rst, "Rotating the key"):

- ``key add PATH``: a new key, accepted by members that read the file, not yet used to send;
- ``key use PATH ID``: seal with key ID from now on;
- ``key retire PATH ID``: forget key ID;
- ``key list PATH``: the key ids, which one sends, their fingerprints (never the keys).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from groupcomm.cli.errors import EXIT_OK, UsageError

__all__ = ["add_parser"]


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "keygen", help="write a new cluster key file (mode 0600)",
        description="Write a new random cluster key to PATH (mode 0600). Name it in the stack's CRYPTO layer "
                    "(key_file, or $GROUPCOMM_KEY_FILE with the shipped stacks) on every member.",
    )
    p.add_argument("path", metavar="PATH", help="where to write the key file")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(run=run_keygen)

    k = commands.add_parser(
        "key", help="add, switch, retire or list the keys of a key file (key rotation)",
        description="Change a cluster key file in place. A rotation: 'key add', copy the file to every member; "
                    "'key use NEW', copy; 'key retire OLD', copy. Members read their key file again "
                    "every CRYPTO reload_interval (default 1 s).",
    )
    steps = k.add_subparsers(dest="step", required=True, metavar="STEP", title="steps")
    add = steps.add_parser("add", help="add a new random key (accepted, not yet used to send)")
    add.add_argument("path", metavar="PATH")
    add.set_defaults(run=run_add)
    use = steps.add_parser("use", help="seal with key ID from now on")
    use.add_argument("path", metavar="PATH")
    use.add_argument("key_id", type=int, metavar="ID")
    use.set_defaults(run=run_use)
    retire = steps.add_parser("retire", help="forget key ID (not the one in use)")
    retire.add_argument("path", metavar="PATH")
    retire.add_argument("key_id", type=int, metavar="ID")
    retire.set_defaults(run=run_retire)
    show = steps.add_parser("list", help="key ids, the one in use, fingerprints")
    show.add_argument("path", metavar="PATH")
    show.set_defaults(run=run_list)


def run_keygen(args: argparse.Namespace) -> int:
    from groupcomm.config.keys import new_key_file, write_key_file

    if os.path.exists(args.path) and not args.force:
        raise UsageError(f"{args.path} exists; pass --force to replace it (members holding the old key "
                         "will no longer understand the new one)")
    write_key_file(args.path, new_key_file())
    print(f"wrote a new cluster key to {args.path} (mode 0600)", file=sys.stderr)
    return EXIT_OK


def _change(path: str, how) -> int:
    from groupcomm.config.keys import read_key_file, write_key_file

    before = read_key_file(path)
    after = how(before)
    write_key_file(path, after)
    _print(after)
    return EXIT_OK


def run_add(args: argparse.Namespace) -> int:
    return _change(args.path, lambda keys: keys.with_new_key())


def run_use(args: argparse.Namespace) -> int:
    return _change(args.path, lambda keys: keys.using(args.key_id))


def run_retire(args: argparse.Namespace) -> int:
    return _change(args.path, lambda keys: keys.without(args.key_id))


def run_list(args: argparse.Namespace) -> int:
    from groupcomm.config.keys import read_key_file

    _print(read_key_file(args.path))
    return EXIT_OK


def _print(keys) -> None:
    from groupcomm.config.keys import fingerprint

    for key_id, key in sorted(keys.keys.items()):
        print(f"{key_id:>3}  {fingerprint(key)}  {'send' if key_id == keys.send else 'accept'}")
