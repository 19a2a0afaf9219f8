"""Deployment plans (groupcomm.services.provisioning.plan): the plan.toml parser and its errors,
the plan digest, resolving bundles (real wheels and .tar.gz from tests/bundles.py, signatures),
choosing target nodes, the synthetic per-role state and the diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.bundle import read_bundle
from groupcomm.services.provisioning.ops import BundleRef, RoleTarget
from groupcomm.services.provisioning.plan import (
    DEFAULT_HEALTH_TIMEOUT,
    Assignment,
    EnvRole,
    EnvSpec,
    PlanError,
    begin_rollout,
    choose_targets,
    diff,
    load_plan,
    plan_requires,
    planned_assignments,
    resolve,
    role_state,
)
from groupcomm.services.provisioning.signing import (
    generate_signing_key,
    sign,
    write_signature,
)
from tests.bundles import build_tarball, build_wheel

PLAN = '''\
[plan]
name = "shop"
description = "the web shop"

[roles.web]
bundles = ["dist/hello_bundle-{web}-py3-none-any.whl"]
config.hello = {{ greeting = "hi", port = "8080" }}

[roles.app]
bundles = ["dist/hello-bundle-1.0.tar.gz"]

[environments.preprod]
health_timeout = "60s"
batch = 2
roles = {{ web = {{ group = "web-pre", nodes = 2 }}, app = {{ group = "app-pre", nodes = 1 }} }}

[environments.prod]
requires = "preprod"
roles = {{ web = {{ group = "web", nodes = 3 }} }}
'''


def write_plan(tmp_path: Path, text: str | None = None, *, web: str = "2.0") -> Path:
    dist = tmp_path / "dist"
    dist.mkdir(exist_ok=True)
    build_wheel(dist, web)
    build_tarball(dist, "1.0")
    path = tmp_path / "plan.toml"
    path.write_text(text if text is not None else PLAN.format(web=web))
    return path


def test_load_plan_reads_roles_environments_and_defaults(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path))
    assert plan.name == "shop" and plan.description == "the web shop"
    assert list(plan.roles) == ["web", "app"]
    assert plan.roles["web"].bundles == (tmp_path.resolve() / "dist/hello_bundle-2.0-py3-none-any.whl",)
    assert plan.roles["web"].configs == {"hello": {"greeting": "hi", "port": "8080"}}
    assert plan.roles["app"].configs == {}
    pre, prod = plan.environment("preprod"), plan.environment("prod")
    assert pre == EnvSpec("preprod", (EnvRole("web", "web-pre", 2), EnvRole("app", "app-pre", 1)), 2, 60.0, None)
    assert prod == EnvSpec("prod", (EnvRole("web", "web", 3),), 1, DEFAULT_HEALTH_TIMEOUT, "preprod")
    assert len(plan.digest) == 64
    assert plan_requires(plan.text, "prod") == "preprod"
    assert plan_requires(plan.text, "preprod") is None
    assert plan_requires(plan.text, "nowhere") is None


def test_unknown_environment_has_a_did_you_mean(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path))
    with pytest.raises(PlanError, match=r"no environment 'prdo' \(did you mean 'prod'\?\)"):
        plan.environment("prdo")


BAD = [
    # (what to replace, with what, the message expected)
    ('bundles = ["dist/hello_bundle', 'bundels = ["dist/hello_bundle',
     r"\[roles\.web\] bundels: unknown key \(did you mean 'bundles'\?\)"),
    ('[plan]\nname = "shop"', '[plan]\nnme = "shop"', r"\[plan\] nme: unknown key \(did you mean 'name'\?\)"),
    ('name = "shop"', 'name = "sh op"', r"\[plan\] name: expected 1 to 100 letters.*'sh op'"),
    ('batch = 2', 'batch = 0', r"\[environments\.preprod\] batch: expected a whole number from 1 to 1000 \(got 0\)"),
    ('batch = 2', 'bach = 2', r"\[environments\.preprod\] bach: unknown key \(did you mean 'batch'\?\)"),
    ('health_timeout = "60s"', 'health_timeout = "60 parsecs"', r"\[environments\.preprod\] health_timeout:"),
    ('health_timeout = "60s"', 'health_timeout = "0s"', r"health_timeout: expected more than 0s"),
    ('group = "web", nodes = 3', 'group = "web", nodes = 0', (r"\[environments\.prod\] roles\.web\.nodes: "
     r"expected a whole number")),
    ('group = "web", nodes = 3', 'group = "web", nodes = true', r"roles\.web\.nodes: expected a whole number"),
    ('group = "web", nodes = 3', 'grop = "web", nodes = 3', (r"\[environments\.prod\] roles\.web\.grop: unknown "
     r"key \(did you mean 'group'\?\)")),
    ('roles = { web = { group = "web", nodes = 3 } }', 'roles = { wbe = { group = "web", nodes = 3 } }',
     r"\[environments\.prod\] roles\.wbe: no role 'wbe' in \[roles\] \(did you mean 'web'\?\)"),
    ('requires = "preprod"', 'requires = "preprd"', (r"\[environments\.prod\] requires: no environment 'preprd' "
     r"\(did you mean 'preprod'\?\)")),
    ('requires = "preprod"', 'requires = "prod"', r"requires: an environment cannot require itself"),
    ('port = "8080"', 'port = 8080', r"\[roles\.web\] config\.hello\.port: expected a string \(quote numbers"),
    ('config.hello = {', 'config."bad pid" = {', r"\[roles\.web\] config\.bad pid: a PID is"),
    ('[roles.app]\nbundles = ["dist/hello-bundle-1.0.tar.gz"]', '[roles.app]\nbundles = []',
     r"\[roles\.app\] bundles: expected a list of 1 to 100"),
    ('[roles.app]\nbundles = ["dist/hello-bundle-1.0.tar.gz"]',
     '[roles.app]\nbundles = ["dist/hello-bundle-1.0.tar.gz", "dist/hello-bundle-1.0.tar.gz"]',
     r"\[roles\.app\] bundles: a file is listed twice"),
    ('[roles.app]\nbundles = ["dist/hello-bundle-1.0.tar.gz"]', '[roles.app]\nbundles = ["dist/missing.whl"]',
     r"\[roles\.app\] bundles: cannot read .*missing\.whl"),
    ('[environments.preprod]', '[environment.preprod]', (r"plan\.toml: environment: unknown key \(did you mean "
     r"'environments'\?\)")),
    ('name = "shop"', 'name = "shop"\n[[x]]', r"plan\.toml: x: unknown key"),
    ('[plan]', '[plan', r"plan\.toml: not valid TOML"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_every_mistake_names_file_table_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = PLAN.format(web="2.0")
    assert old in text
    path = write_plan(tmp_path, text.replace(old, new, 1))
    with pytest.raises(PlanError, match=message) as info:
        load_plan(path)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ConfigError)


def test_gate_cycles_and_missing_tables_are_refused(tmp_path: Path) -> None:
    text = PLAN.format(web="2.0").replace('health_timeout = "60s"', 'requires = "prod"')
    with pytest.raises(PlanError, match=r"promotion gates form a cycle: (preprod -> prod -> preprod|"
                                        r"prod -> preprod -> prod)"):
        load_plan(write_plan(tmp_path, text))
    with pytest.raises(PlanError, match=r"\[environments\]: missing"):
        load_plan(write_plan(tmp_path, '[plan]\nname = "x"\n[roles.a]\nbundles = ["dist/hello-bundle-1.0.tar.gz"]\n'))
    with pytest.raises(PlanError, match=r"\[plan\]: missing"):
        load_plan(write_plan(tmp_path, "[roles.a]\n"))
    with pytest.raises(PlanError, match="cannot read the plan"):
        load_plan(tmp_path / "nothing.toml")
    big = tmp_path / "big.toml"
    big.write_text("#" * (65 * 1024))
    with pytest.raises(PlanError, match="at most"):
        load_plan(big)


def test_digest_covers_bundle_contents_not_formatting_or_environments(tmp_path: Path) -> None:
    for sub in "abcde":
        (tmp_path / sub).mkdir()
    a = load_plan(write_plan(tmp_path / "a"))
    # the same text and the same files elsewhere: the same digest
    assert load_plan(write_plan(tmp_path / "b")).digest == a.digest
    # comments, formatting and environments do not count
    c_dir = tmp_path / "c"
    text = PLAN.format(web="2.0").replace('nodes = 3', 'nodes = 5') + "# a comment\n"
    assert load_plan(write_plan(c_dir, text)).digest == a.digest
    # a configuration value does
    d_dir = tmp_path / "d"
    assert load_plan(write_plan(d_dir, PLAN.format(web="2.0").replace('"hi"', '"hello"'))).digest != a.digest
    # the same plan text with a rebuilt wheel (other content, same path) does
    e_dir = tmp_path / "e"
    path = write_plan(e_dir)
    before = load_plan(path).digest
    assert before == a.digest
    build_wheel(e_dir / "dist", "2.0", extra_files={"hello_bundle/extra.py": b"# rebuilt\n"})
    assert load_plan(path).digest != before


def test_resolve_reads_bundles_and_signatures(tmp_path: Path) -> None:
    path = write_plan(tmp_path)
    key = generate_signing_key(tmp_path / "signing.key")
    wheel = read_bundle(tmp_path / "dist/hello_bundle-2.0-py3-none-any.whl")
    write_signature(wheel, key)
    plan = load_plan(path)
    resolved = resolve(plan, "preprod")
    assert list(resolved) == ["web", "app"]
    (web_ref,), web_config = resolved["web"]
    assert web_ref == BundleRef("hello-bundle", "2.0", wheel.sha256, wheel.size, wheel.filename, sign(wheel, key))
    assert web_config == {"hello": {"greeting": "hi", "port": "8080"}}
    (app_ref,), app_config = resolved["app"]
    assert (app_ref.name, app_ref.version, app_ref.filename, app_ref.signature) == \
        ("hello-bundle", "1.0", "hello-bundle-1.0.tar.gz", b"")
    assert app_config == {}
    assert list(resolve(plan, "prod")) == ["web"]
    # a file changed after loading is refused
    build_wheel(tmp_path / "dist", "2.0", extra_files={"hello_bundle/extra.py": b"# rebuilt\n"})
    with pytest.raises(PlanError, match=r"\[roles\.web\] bundles: .* changed since the plan was loaded"):
        resolve(plan, "preprod")


def test_resolve_refuses_a_bad_signature_file_and_two_bundles_of_one_name(tmp_path: Path) -> None:
    path = write_plan(tmp_path)
    (tmp_path / "dist/hello_bundle-2.0-py3-none-any.whl.sig").write_text("not a signature\n")
    with pytest.raises(PlanError, match=r"\[roles\.web\] bundles: .*expected 'groupcomm-bundle-signature"):
        resolve(load_plan(path), "prod")
    (tmp_path / "dist/hello_bundle-2.0-py3-none-any.whl.sig").unlink()
    text = PLAN.format(web="2.0").replace('bundles = ["dist/hello-bundle-1.0.tar.gz"]',
                                          'bundles = ["dist/hello-bundle-1.0.tar.gz", '
                                          '"dist/hello_bundle-2.0-py3-none-any.whl"]')
    with pytest.raises(PlanError, match=r"\[roles\.app\] bundles: two bundles named 'hello-bundle'"):
        resolve(load_plan(write_plan(tmp_path, text)), "preprod")


def test_choose_targets_first_members_one_role_per_node() -> None:
    spec = EnvSpec("e", (EnvRole("web", "front", 2), EnvRole("app", "back", 1)), 1, 60.0, None)
    members = {"front": ["n3", "n1", "n2"], "back": ["n9", "n8"]}
    assert choose_targets(spec, members) == (RoleTarget("n3", "web"), RoleTarget("n1", "web"),
                                             RoleTarget("n9", "app"))
    # two roles on one group get distinct nodes, in the group's order
    shared = EnvSpec("e", (EnvRole("web", "all", 2), EnvRole("app", "all", 1)), 1, 60.0, None)
    assert choose_targets(shared, {"all": ["a", "b", "c", "d"]}) == (
        RoleTarget("a", "web"), RoleTarget("b", "web"), RoleTarget("c", "app"))
    with pytest.raises(PlanError, match=r"role 'app' wants 1 node of group 'all', which has 2 members "
                                        r"\(2 already given another role of this environment\)"):
        choose_targets(shared, {"all": ["a", "b"]})
    with pytest.raises(PlanError, match=r"role 'web' wants 2 nodes of group 'front', which has 0 members"):
        choose_targets(spec, {})


def test_begin_rollout_and_planned_assignments(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path))
    resolved = resolve(plan, "preprod")
    targets = choose_targets(plan.environment("preprod"), {"web-pre": ["w1", "w2"], "app-pre": ["a1"]})
    begin = begin_rollout(plan, "preprod", resolved, targets)
    assert (begin.env, begin.plan_digest, begin.plan, begin.batch, begin.health_timeout, begin.force) == \
        ("preprod", plan.digest, plan.text, 2, 60.0, False)
    assert begin_rollout(plan, "preprod", resolved, targets, batch=1, force=True).batch == 1
    with pytest.raises(PlanError, match="--batch"):
        begin_rollout(plan, "preprod", resolved, targets, batch=0)
    planned = planned_assignments("preprod", 7, begin.roles, begin.targets)
    assert set(planned) == {"w1", "w2", "a1"}
    web = planned["w1"]
    assert web.role == "web" and web.state.group == "plan.preprod" and web.state.revision == 7
    (desired,) = web.state.bundles.values()
    assert desired.started and desired.version == "2.0"
    assert web.state.configs == {"hello": {"greeting": "hi", "port": "8080"}}


def ref(name: str, version: str, digest_char: str = "a") -> BundleRef:
    return BundleRef(name, version, digest_char * 64, 10, f"{name}-{version}.tar.gz")


def test_diff_lists_role_bundle_and_config_changes() -> None:
    old = {
        "n1": Assignment("web", role_state("p", 1, [ref("hello", "1.0"), ref("gone", "0.1")], {"h": {"a": "1", "b": "x"}})),
        "n2": Assignment("web", role_state("p", 1, [ref("hello", "1.0")], {})),
        "n3": Assignment("app", role_state("p", 1, [ref("app", "3.0")], {})),
        "n5": Assignment("app", role_state("p", 1, [ref("app", "3.0")], {})),
    }
    new = {
        "n1": Assignment("web", role_state("p", 2, [ref("hello", "2.0", "b"), ref("new", "1")], {"h": {"a": "2", "c": "y"}})),
        "n2": Assignment("web", role_state("p", 2, [ref("hello", "1.0", "c")], {})),   # rebuilt
        "n4": Assignment("web", role_state("p", 2, [ref("hello", "2.0", "b")], {})),
        "n5": Assignment("app", role_state("p", 2, [ref("app", "3.0")], {})),
    }
    d = diff(old, new)
    assert [n.node for n in d.nodes] == ["n1", "n2", "n3", "n4", "n5"]
    assert d.changed and not d.nodes[-1].changed
    assert str(d) == "\n".join([
        "n1: role web",
        "  bundle gone: remove 0.1",
        "  bundle hello: 1.0 -> 2.0",
        "  bundle new: add 1",
        "  config h a: '1' -> '2'",
        "  config h b: delete (was 'x')",
        "  config h c: set 'y'",
        "n2: role web",
        f"  bundle hello: 1.0 rebuilt ({'a' * 12} -> {'c' * 12})",
        "n3: loses role app",
        "  bundle app: remove 3.0",
        "n4: gets role web",
        "  bundle hello: add 2.0",
        "n5: role app, unchanged",
    ])
    same = diff({"n5": old["n5"]}, {"n5": new["n5"]})
    assert not same.changed and str(same).endswith("nothing would change")
    moved = diff({"n1": old["n3"]}, {"n1": old["n1"]})
    assert str(moved).startswith("n1: role app -> web")
