"""Bundles (issue 12): reading, hostile archives, the store, signatures, environments, a real run."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.bundle import (
    Bundle,
    BundleError,
    Limits,
    parse_manifest,
    read_bundle,
)
from groupcomm.services.provisioning.environments import Environments, InstallError
from groupcomm.services.provisioning.signing import (
    SignatureError,
    generate_signing_key,
    load_public_keys,
    load_signing_key,
    parse_public_key,
    read_signature,
    sign,
    signed_message,
    verify,
    verify_file,
    write_signature,
)
from groupcomm.services.provisioning.store import DigestMismatch, QuotaExceeded, Store
from tests.bundles import (
    BUNDLE_NAME,
    Entry,
    build_tarball,
    build_wheel,
    hello_entries,
    manifest,
    write_tar,
)

# --------------------------------------------------------------------------- reading


def test_read_wheel(tmp_path: Path) -> None:
    path = build_wheel(tmp_path, "1.0")
    b = read_bundle(path)
    assert (b.kind, b.name, b.version) == ("wheel", BUNDLE_NAME, "1.0")
    assert b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert b.size == path.stat().st_size
    assert b.filename == path.name
    assert b.manifest.config == ("org.example.hello",)
    assert b.manifest.description == "answers GET / with its version"


def test_read_tarball(tmp_path: Path) -> None:
    path = build_tarball(tmp_path, "2.0")
    b = read_bundle(path)
    assert (b.kind, b.name, b.version, b.filename) == ("tar.gz", BUNDLE_NAME, "2.0", "hello-bundle-2.0.tar.gz")
    assert b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("build", [build_wheel, build_tarball])
def test_a_store_blob_is_read_by_its_content(tmp_path: Path, build) -> None:
    original = read_bundle(build(tmp_path, "1.0"))
    blob = tmp_path / "blob"
    shutil.copyfile(original.path, blob)
    b = read_bundle(blob)
    assert (b.kind, b.sha256, b.filename) == (original.kind, original.sha256, original.filename)


def test_process_spec_of_an_installed_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = read_bundle(build_wheel(tmp_path, "1.0"))
    tarball = read_bundle(build_tarball(tmp_path, "1.0"))
    monkeypatch.setenv("PORT", "1")  # the node's environment is not consulted
    spec = wheel.process_spec("/srv/h", "/srv/h/bin/python")
    assert spec.name == BUNDLE_NAME
    assert spec.command == ("/srv/h/bin/python", "-m", "hello_bundle", "8080")
    assert spec.health is not None and spec.health.url == "http://127.0.0.1:8080/"
    assert (spec.cwd, spec.restart, spec.stop_grace) == ("/srv/h", "always", 2.0)
    assert dict(spec.env) == {"PYTHONUNBUFFERED": "1", "BUNDLE_HOME": "/srv/h", "BUNDLE_PYTHON": "/srv/h/bin/python",
                              "BUNDLE_NAME": BUNDLE_NAME, "BUNDLE_VERSION": "1.0"}
    spec = tarball.process_spec("/srv/t", "/srv/t/bin/python", name="hello-2", environ={"PORT": "9000"})
    assert (spec.name, spec.cwd) == ("hello-2", "/srv/t/app")
    assert spec.command[-1] == "9000" and spec.health is not None and spec.health.url.endswith(":9000/")


def test_version_is_normalized() -> None:
    m = parse_manifest(manifest("1.0.0-RC1"))
    assert m.version == "1.0.0rc1"


@pytest.mark.parametrize(("text", "message"), [
    ("name = ", "not valid TOML"),
    (manifest("1.0", extra='verison = "1"'), "verison: unknown key (did you mean 'version'?)"),
    (manifest("1.0").replace("command =", "comand ="), "start: comand: unknown key (did you mean 'command'?)"),
    (manifest("1.0").replace('interval = "1s"', 'intervall = "1s"'), "health.intervall: unknown key"),
    (manifest("1.0").replace("[start]", "[begin]"), "begin: unknown key"),
    ('name = "x"\nversion = "1"\n', "start: missing"),
    (manifest("1.0", name="-x"), "name: expected"),
    (manifest("one"), "version: not a PEP 440 version"),
    (manifest("1.0").replace("${PORT:8080}", "${PORT}"), "'PORT' is not set and has no default"),
    (manifest("1.0").replace('restart = "always"', 'restart = "sometimes"'), "restart: expected one of"),
    (manifest("1.0").replace('"org.example.hello"', '"a", "a"'), "config: a PID is listed twice"),
    (manifest("1.0").replace('kind = "http"', 'kind = "smoke"'), "health.kind"),
])
def test_manifest_errors(text: str, message: str) -> None:
    with pytest.raises(BundleError, match=None) as info:
        parse_manifest(text, source="x/bundle.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("x/bundle.toml")
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"with_manifest": False}, "no hello_bundle-1.0.dist-info/bundle.toml"),
    ({"manifest_text": manifest("1.0", name="other")},
     "name: the wheel's hello_bundle-1.0.dist-info directory says 'hello_bundle', bundle.toml says 'other'"),
    ({"manifest_text": manifest("2.0")}, "version: the wheel's hello_bundle-1.0.dist-info directory says '1.0'"),
    ({"metadata_version": "1.1"}, "version: the wheel's METADATA says '1.1'"),
    ({"filename": "hello_bundle-3.0-py3-none-any.whl"}, "version: the wheel's file name says '3.0'"),
    ({"extra_files": {"../evil.py": b"x"}}, "member '../evil.py': path with '..'"),
    ({"extra_files": {"/abs.py": b"x"}}, "member '/abs.py': absolute path"),
    ({"manifest_text": "x" * 70_000}, "bundle.toml: larger than 65536 bytes"),
])
def test_wheel_errors_name_the_file_and_field(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = build_wheel(tmp_path, "1.0", **kwargs)
    with pytest.raises(BundleError) as info:
        read_bundle(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_files_that_are_not_bundles(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BundleError, match="neither a wheel"):
        read_bundle(text)
    fake = tmp_path / "x-1.0-py3-none-any.whl"
    shutil.copyfile(build_tarball(tmp_path, "1.0"), fake)
    with pytest.raises(BundleError, match="the name says wheel but the content is a tar.gz"):
        read_bundle(fake)
    with pytest.raises(BundleError, match="cannot read"):
        read_bundle(tmp_path / "missing.whl")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gzip.compress(b"not a tar archive" * 100))
    with pytest.raises(BundleError, match="not a valid .tar.gz"):
        read_bundle(broken)


# --------------------------------------------------------------------------- hostile archives


def _zeros_bomb(path: Path, size: int) -> Path:
    """A .tar.gz whose one member is ``size`` zero bytes (compresses ~1000:1)."""
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tf:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return path


HOSTILE = {
    "traversal": ([Entry("../evil", b"x")], "member '../evil': path with '..'"),
    "deep traversal": ([Entry("a/../../evil", b"x")], "path with '..'"),
    "absolute": ([Entry("/tmp/evil", b"x")], "member '/tmp/evil': absolute path"),
    "symlink escape": ([Entry("up", type=tarfile.SYMTYPE, linkname="../../etc")], "points outside the archive"),
    "absolute symlink": ([Entry("pw", type=tarfile.SYMTYPE, linkname="/etc/passwd")], "only relative links"),
    "write through symlink": ([Entry("d", type=tarfile.SYMTYPE, linkname="."), Entry("d/x", b"x")],
                              "its path goes through the symlink 'd'"),
    "climb through symlink": ([Entry("p", type=tarfile.DIRTYPE), Entry("p/q", type=tarfile.SYMTYPE, linkname="."),
                               Entry("s", type=tarfile.SYMTYPE, linkname="p/q/../x")],
                              "goes through the symlink 'p/q'"),
    "hard link outside": ([Entry("pw", type=tarfile.LNKTYPE, linkname="/etc/passwd")], "absolute path"),
    "hard link to nothing": ([Entry("pw", type=tarfile.LNKTYPE, linkname="README2")],
                             "not an earlier file of the archive"),
    "device": ([Entry("null", type=tarfile.CHRTYPE)], "a device, FIFO or other special file"),
    "fifo": ([Entry("pipe", type=tarfile.FIFOTYPE)], "a device, FIFO or other special file"),
    "duplicate": ([Entry("README", b"again")], "member 'README': appears twice"),
    "lying size": ([Entry("huge", b"x", size=10**12)], "members hold more than"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tarballs_are_refused_when_read_and_when_installed(tmp_path: Path, case: str) -> None:
    extra, message = HOSTILE[case]
    path = write_tar(tmp_path / "hostile.tar.gz", [*hello_entries("1.0"), *extra])
    with pytest.raises(BundleError) as info:
        read_bundle(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    # Extraction checks again on its own: give it the hostile file under a good bundle's identity.
    good = read_bundle(build_tarball(tmp_path, "1.0"))
    envs = Environments(tmp_path / "envs")
    with pytest.raises(InstallError) as info:
        envs.install(dataclasses.replace(good, path=path))
    assert message in str(info.value)
    assert envs.installed(good) is None and not envs.home(good).exists()
    assert list((tmp_path / "envs" / ".tmp").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_bounds_on_size_and_member_count(tmp_path: Path) -> None:
    many = write_tar(tmp_path / "many.tar.gz", [*hello_entries("1.0"), *(Entry(f"f{i}", b"") for i in range(20))])
    with pytest.raises(BundleError, match="more than 10 members"):
        read_bundle(many, limits=Limits(members=10))
    assert read_bundle(many).name == BUNDLE_NAME
    big = build_tarball(tmp_path, "1.0", extra=[Entry("big", b"y" * 5000)])
    with pytest.raises(BundleError, match="members hold more than 4096 bytes"):
        read_bundle(big, limits=Limits(total_bytes=4096))
    bomb = _zeros_bomb(tmp_path / "bomb.tar.gz", 8 * 1024 * 1024)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BundleError, match="more than 1048576 bytes"):
        read_bundle(bomb, limits=Limits(total_bytes=1024 * 1024))
    wheel = build_wheel(tmp_path, "1.0", extra_files={f"hello_bundle/m{i}.py": b"" for i in range(20)})
    with pytest.raises(BundleError, match="more than 10 members"):
        read_bundle(wheel, limits=Limits(members=10))
    oversized = build_tarball(tmp_path, "1.0", manifest_text=manifest("1.0") + "#" * 2000)
    with pytest.raises(BundleError, match="bundle.toml: larger than 1000 bytes"):
        read_bundle(oversized, limits=Limits(manifest_bytes=1000))


def test_a_huge_pax_header_is_stopped_by_the_stream_bound(tmp_path: Path) -> None:
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"comment": "x" * (4 * 1024 * 1024)}  # read into memory by tarfile
        tf.addfile(info, io.BytesIO(b""))
    assert path.stat().st_size < 100_000
    with pytest.raises(BundleError, match="expands to more than"):
        read_bundle(path, limits=Limits(total_bytes=1024 * 1024, members=100))


def test_tarball_without_manifest(tmp_path: Path) -> None:
    entries = [e for e in hello_entries("1.0") if e.name != "bundle.toml"]
    nested = write_tar(tmp_path / "nested.tar.gz", [*entries, Entry("sub/bundle.toml", manifest("1.0").encode())])
    with pytest.raises(BundleError, match="no bundle.toml at the archive's top level"):
        read_bundle(nested)
    dotted = write_tar(tmp_path / "dotted.tar.gz", [*entries, Entry("./bundle.toml", manifest("1.0").encode())])
    assert read_bundle(dotted).version == "1.0"


# --------------------------------------------------------------------------- the store


def _blob(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in (store.root / "tmp").iterdir())


def test_store_put_has_path_size_remove(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    src, digest = _blob(tmp_path, "a", b"alpha" * 1000)
    assert not store.has(digest)
    assert store.put_file(src) == digest
    assert store.has(digest) and store.path(digest) == tmp_path / "store" / "sha256" / digest
    assert store.path(digest).read_bytes() == src.read_bytes()
    assert stat.S_IMODE(store.path(digest).stat().st_mode) == 0o444
    assert store.size(digest) == 5000 and store.used == 5000
    assert store.put_file(src, expected=digest) == digest and store.used == 5000  # stored once
    assert store.digests() == {digest}
    assert Store(tmp_path / "store").used == 5000  # counted again when reopened
    assert store.remove(digest) and not store.has(digest) and store.used == 0
    assert not store.remove(digest)
    with pytest.raises(KeyError):
        store.size(digest)
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.path("../../etc/passwd")


def test_store_refuses_other_content_and_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    src, digest = _blob(tmp_path, "a", b"alpha")
    _, other = _blob(tmp_path, "b", b"beta")
    with pytest.raises(DigestMismatch, match=f"expected {other}"):
        store.put_file(src, expected=other)
    assert store.digests() == set() and _leftovers(store) == [] and store.used == 0
    store.put_file(src)
    with pytest.raises(DigestMismatch):  # the expected blob exists already: the source is still checked
        store.put_file(tmp_path / "b", expected=digest)


def test_store_streaming_writer(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", quota=100)
    data = bytes(range(90))
    digest = hashlib.sha256(data).hexdigest()
    with store.open_writer(digest, len(data)) as w:
        for i in range(0, len(data), 7):
            w.write(data[i:i + 7])
        assert w.commit() == digest
    assert store.path(digest).read_bytes() == data and store.used == 90
    store.remove(digest)
    # Wrong bytes, too many, too few: a clear error and nothing left; the reservation is released.
    with store.open_writer(digest, len(data)) as w:
        w.write(bytes(90))
        with pytest.raises(DigestMismatch, match="SHA-256 is"):
            w.commit()
    with store.open_writer(digest, len(data)) as w, pytest.raises(DigestMismatch, match="more than the announced"):
        w.write(data + b"!")
    with store.open_writer(digest, len(data)) as w:
        w.write(data[:10])
        with pytest.raises(DigestMismatch, match="10 bytes, announced 90"):
            w.commit()
    with store.open_writer(digest, len(data)) as w:
        w.write(data[:10])  # left without commit: discarded
    assert store.digests() == set() and _leftovers(store) == [] and store.used == 0
    with store.open_writer(digest, len(data)) as w:  # the whole quota is free again
        w.write(data)
        w.commit()
    assert store.has(digest)


def test_store_quota_is_checked_before_writing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", quota=1500)
    a, da = _blob(tmp_path, "a", b"a" * 1000)
    b, db = _blob(tmp_path, "b", b"b" * 1000)
    store.put_file(a)
    with pytest.raises(QuotaExceeded, match="would exceed the store's quota of 1500 bytes"):
        store.put_file(b)
    with pytest.raises(QuotaExceeded):
        store.open_writer(db, 1000)
    assert _leftovers(store) == [] and store.digests() == {da}
    assert store.put_file(a) == da  # already stored: no quota needed
    writer = store.open_writer(hashlib.sha256(b"c" * 400).hexdigest(), 400)  # reserves 400 of the 500 left
    with pytest.raises(QuotaExceeded, match="400 reserved"):
        store.open_writer(hashlib.sha256(b"d" * 200).hexdigest(), 200)
    writer.abort()
    assert store.gc(keep=set()) == {da} and store.used == 0
    assert store.put_file(b) == db


def test_store_gc_keeps_what_is_asked(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    digests = [store.put_file(_blob(tmp_path, f"f{i}", f"file {i}".encode())[0]) for i in range(4)]
    assert store.gc(keep={digests[0], digests[2]}) == {digests[1], digests[3]}
    assert store.digests() == {digests[0], digests[2]}


def test_store_concurrent_writers_of_one_digest(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", quota=10 * 300_000)
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with store.open_writer(digest, len(data)) as w:
                for i in range(0, len(data), 4096):
                    w.write(data[i:i + 4096])
                w.commit()
        except Exception as e:  # noqa: BLE001 -- collected: a thread's failure fails the test
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert store.path(digest).read_bytes() == data
    assert store.used == len(data) and _leftovers(store) == []


def test_opening_a_store_clears_unfinished_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    w = store.open_writer(hashlib.sha256(b"x").hexdigest(), 1)
    w.write(b"x")  # the process "dies" here
    assert len(_leftovers(store)) == 1
    assert _leftovers(Store(tmp_path / "store")) == []


# --------------------------------------------------------------------------- signatures


def test_signing_key_file(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "key.pem")
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "key.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert load_signing_key(tmp_path / "key.pem").public == key.public
    with pytest.raises(FileExistsError):
        generate_signing_key(tmp_path / "key.pem")
    os.chmod(tmp_path / "key.pem", 0o644)
    with pytest.raises(SignatureError, match="accessible to group or others"):
        load_signing_key(tmp_path / "key.pem")
    (tmp_path / "junk.pem").write_text("junk")
    os.chmod(tmp_path / "junk.pem", 0o600)
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_signing_key(tmp_path / "junk.pem")


def test_public_keys_round_trip(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "key.pem").public
    line = dataclasses.replace(key, comment="release key").to_line()
    assert line.startswith("ed25519 ") and line.endswith(" release key")
    (tmp_path / "trusted").write_text(f"# who we trust\n\n{line}\n")
    assert [k.raw for k in load_public_keys(tmp_path / "trusted")] == [key.raw]
    assert len(key.key_id) == 16 and key.key_id == hashlib.sha256(key.raw).hexdigest()[:16]
    with pytest.raises(SignatureError, match="trusted:2: expected 'ed25519"):
        (tmp_path / "trusted").write_text(f"{line}\nrsa AAAA\n")
        load_public_keys(tmp_path / "trusted")
    with pytest.raises(SignatureError, match="32 bytes"):
        parse_public_key("ed25519 AAAA")


def test_sign_and_verify(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "key.pem")
    other = generate_signing_key(tmp_path / "other.pem")
    bundle = read_bundle(build_wheel(tmp_path, "1.0"))
    sig_path = write_signature(bundle, key)
    assert sig_path == tmp_path / (bundle.path.name + ".sig")
    words = sig_path.read_text().split()
    assert words[:4] == ["groupcomm-bundle-signature", "v1", "ed25519", key.public.key_id]
    assert read_signature(sig_path) == sign(bundle, key)
    assert signed_message(bundle).startswith(b"groupcomm-bundle-signature-v1\0" + bytes.fromhex(bundle.sha256))
    assert verify_file(bundle, [other.public, key.public]) == key.public.key_id
    assert verify(bundle, sign(bundle, key), [key.public]) == key.public.key_id
    # Untrusted key: the error names the bundle.
    with pytest.raises(SignatureError, match=rf"{bundle.path}: bundle hello-bundle 1.0 .*no trusted key"):
        verify_file(bundle, [other.public])
    with pytest.raises(SignatureError, match="trusted keys: none"):
        verify_file(bundle, [])


def test_a_tampered_bundle_fails_verification(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "key.pem")
    original = read_bundle(build_wheel(tmp_path, "1.0"))
    signature = sign(original, key)
    tampered_dir = tmp_path / "tampered"
    tampered_dir.mkdir()
    tampered = read_bundle(build_wheel(tampered_dir, "1.0", extra_files={"hello_bundle/evil.py": b"import os"}))
    assert (tampered.name, tampered.version) == (original.name, original.version)
    with pytest.raises(SignatureError, match=f"{tampered.path}.*no trusted key verifies"):
        verify(tampered, signature, [key.public])
    # A signature binds name and version too (same bytes claimed under another version).
    with pytest.raises(SignatureError):
        verify(dataclasses.replace(original, manifest=dataclasses.replace(original.manifest, version="9.0")),
               signature, [key.public])
    (tmp_path / "bad.sig").write_text("groupcomm-bundle-signature v1 ed25519 x !!!\n")
    with pytest.raises(SignatureError, match="not base64"):
        read_signature(tmp_path / "bad.sig")


# --------------------------------------------------------------------------- environments and a real run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_get(bundle: Bundle, home: Path, python: Path) -> str:
    """Start the installed bundle as its ProcessSpec says, GET / and return the body; always stop it."""
    port = _free_port()
    spec = bundle.process_spec(home, python, environ={"PORT": str(port)})
    proc = subprocess.Popen(spec.command, cwd=spec.cwd, env={**os.environ, **spec.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the bundle did not serve: exit {proc.poll()}, "
                                         f"{proc.stderr.read().decode() if proc.poll() is not None else ''}")
                time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()


def test_removing_the_last_other_version_during_an_install_does_not_break_it(tmp_path: Path, monkeypatch) -> None:
    # The reconciler upgrades with "install 2.0" and "uninstall 1.0" at once: remove() deleted the
    # bundle's (empty) directory while install() was building, and its final rename failed.
    import threading

    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    b1 = read_bundle(build_tarball(tmp_path / "v1", "1.0"))
    b2 = read_bundle(build_tarball(tmp_path / "v2", "2.0"))
    envs = Environments(tmp_path / "envs")
    envs.install(b1)
    built, removed = threading.Event(), threading.Event()
    real_build = Environments._build

    def slow_build(self, bundle, env, home):
        real_build(self, bundle, env, home)
        built.set()
        assert removed.wait(10)

    monkeypatch.setattr(Environments, "_build", slow_build)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(envs.install(b2)))
    worker.start()
    assert built.wait(30)
    assert envs.remove(BUNDLE_NAME, "1.0") == 1
    removed.set()
    worker.join(30)
    assert result and result[0].version == "2.0" and envs.installed(b2) == result[0]
    assert [e.version for e in envs.list()] == ["2.0"]


@pytest.mark.parametrize("build", [build_wheel, build_tarball])
def test_install_run_reinstall_remove(tmp_path: Path, build) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    b1 = read_bundle(build(tmp_path / "v1", "1.0"))
    b2 = read_bundle(build(tmp_path / "v2", "2.0"))
    envs = Environments(tmp_path / "envs")
    e1 = envs.install(b1)
    assert e1.home == tmp_path / "envs" / BUNDLE_NAME / f"1.0-{b1.sha256[:12]}"
    assert (e1.name, e1.version, e1.sha256, e1.kind) == (BUNDLE_NAME, "1.0", b1.sha256, b1.kind)
    assert e1.python.exists() and envs.installed(b1) == e1
    assert _run_and_get(b1, e1.home, e1.python) == "1.0"
    e2 = envs.install(b2)
    assert _run_and_get(b2, e2.home, e2.python) == "2.0"
    # The build directory's path is nowhere in the environment's scripts.
    for path in [e1.home / "pyvenv.cfg", *(e1.home / "bin").iterdir()]:
        if path.is_file() and not path.is_symlink():
            assert b"/.tmp/" not in path.read_bytes(), path
    # Reinstalling is a no-op: the environment (its marker) is the same file.
    marker = e1.home / ".groupcomm-bundle.json"
    before = marker.stat()
    assert envs.install(b1) == e1
    assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [(e.version, e.sha256) for e in envs.list()] == [("1.0", b1.sha256), ("2.0", b2.sha256)]
    assert envs.remove(BUNDLE_NAME, "1.0") == 1
    assert not e1.home.exists() and envs.installed(b1) is None
    assert envs.remove(BUNDLE_NAME, "1.0") == 0
    assert [e.version for e in envs.list()] == ["2.0"]
    assert _run_and_get(b2, e2.home, e2.python) == "2.0"
    assert envs.remove(BUNDLE_NAME, "2.0") == 1 and not (tmp_path / "envs" / BUNDLE_NAME).exists()
    with pytest.raises(ValueError):
        envs.remove("../x", "1.0")


def test_install_with_pip_inside_the_venv(tmp_path: Path) -> None:
    bundle = read_bundle(build_wheel(tmp_path, "1.0"))
    env = Environments(tmp_path / "envs", pip="venv").install(bundle)
    assert (env.home / "bin" / "pip").exists()
    assert _run_and_get(bundle, env.home, env.python) == "1.0"


def test_an_incomplete_environment_is_rebuilt(tmp_path: Path) -> None:
    bundle = read_bundle(build_tarball(tmp_path, "1.0"))
    envs = Environments(tmp_path / "envs")
    home = envs.home(bundle)
    (home / "app").mkdir(parents=True)
    (home / "app" / "half-written").write_text("")
    env = envs.install(bundle)
    assert not (home / "app" / "half-written").exists()
    assert (home / "app" / "hello_bundle" / "__main__.py").exists()
    assert (home / "app" / "docs").readlink() == Path("README")
    assert envs.installed(bundle) == env


def test_a_failed_install_leaves_nothing(tmp_path: Path) -> None:
    bundle = read_bundle(build_wheel(tmp_path, "1.0"))
    envs = Environments(tmp_path / "envs", python=tmp_path / "no-such-python")
    with pytest.raises(InstallError, match=rf"{bundle.path}: venv: cannot run"):
        envs.install(bundle)
    assert not envs.home(bundle).exists() and list((tmp_path / "envs" / ".tmp").iterdir()) == []
    # pip failing (a wheel file whose RECORD lies about a file) names the step and shows pip's words.
    (tmp_path / "bad").mkdir()
    bad = build_wheel(tmp_path / "bad", "1.0", extra_files={"hello_bundle/extra.py": b"x = 1\n"})
    good_envs = Environments(tmp_path / "envs2")
    broken = tmp_path / "bad" / "broken.whl"
    shutil.copyfile(bad, broken)
    with open(broken, "r+b") as f:  # corrupt the compressed data of the first member
        f.seek(60)
        f.write(b"\xff" * 40)
    with pytest.raises(InstallError, match="pip install failed"):
        good_envs.install(dataclasses.replace(read_bundle(bad), path=broken))
    assert good_envs.list() == [] and list((tmp_path / "envs2" / ".tmp").iterdir()) == []
