"""The node file's [provisioning] table: the agent's settings, every mistake one ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from groupcomm.errors import ConfigError
from groupcomm.services.provisioning.settings import parse_provisioning


def test_defaults_take_the_member_state_directory_and_paths_are_relative_to_the_node_file(tmp_path):
    settings, socket = parse_provisioning({}, source="n1.toml", base_dir=tmp_path, member_dir=tmp_path / "m")
    assert Path(settings.state_dir) == tmp_path / "m" / "provisioning" and socket is None
    assert settings.store_quota is None and settings.policy.route("web", "bundles", "x") == "shared"
    settings, socket = parse_provisioning(
        {"state_dir": "state", "store_quota": "1MiB", "op_timeout": "5s", "socket": "/run/p.sock",
         "health_wait": "2s", "rollout_interval": "100ms",
         "sync": {"default": {"bundles": {"mode": "node"}}}},
        source="n1.toml", base_dir=tmp_path)
    assert Path(settings.state_dir) == tmp_path / "state" and socket == Path("/run/p.sock")
    assert settings.store_quota == 1 << 20 and settings.op_timeout == 5.0
    assert (settings.health_wait, settings.rollout_interval, settings.converge_timeout) == (2.0, 0.1, 600.0)
    assert settings.policy.route("web", "bundles", "x") == "local"


@pytest.mark.parametrize(("table", "message"), [
    ({"stat_dir": "x"}, "n1.toml: provisioning.stat_dir: unknown key (did you mean 'state_dir'?)"),
    ({"state_dir": 3}, "n1.toml: provisioning.state_dir: expected a path (got 3)"),
    ({"store_quota": "lots"}, "n1.toml: provisioning.store_quota"),
    ({"op_timeout": "0s"}, "n1.toml: provisioning.op_timeout: must be positive"),
    ({"publish_interval": "soon"}, "n1.toml: provisioning.publish_interval"),
    ({"sync": {"default": {"bundles": {"mode": "nod"}}}}, "n1.toml: provisioning.sync.default.bundles.mode"),
])
def test_mistakes_name_the_file_and_the_field(tmp_path, table, message):
    with pytest.raises(ConfigError) as failed:
        parse_provisioning(table, source="n1.toml", member_dir=tmp_path)
    assert str(failed.value).startswith(message), str(failed.value)


def test_without_a_member_state_directory_state_dir_is_required():
    with pytest.raises(ConfigError, match="n1.toml: provisioning.state_dir: required"):
        parse_provisioning({}, source="n1.toml")
