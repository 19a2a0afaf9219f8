"""The JSON lines both control servers answer with (groupcomm.services.unix_socket)."""

from __future__ import annotations

import json
import logging

import pytest

from groupcomm.services.unix_socket import encode_line, error_line

_log = logging.getLogger("test.unix_socket")


def test_a_line_is_compact_json_with_its_newline_up_to_the_limit() -> None:
    line = encode_line({"ok": True, "result": [1, "é"]}, 33, log=_log, where="here")
    assert line == b'{"ok":true,"result":[1,"\\u00e9"]}\n'
    assert encode_line({"a": "x" * 10}, 18, log=_log, where="here") == b'{"a":"xxxxxxxxxx"}\n'
    with pytest.raises(ValueError, match=r"answer too long \(18 bytes, the limit is 17\)"):
        encode_line({"a": "x" * 10}, 17, log=_log, where="here")


@pytest.mark.parametrize("message", [{"x": object()}, {"x": float("nan")}])
def test_what_is_not_json_is_an_internal_error_and_logged(message, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="test.unix_socket"), \
            pytest.raises(ValueError, match="^internal error: the answer is not JSON$"):
        encode_line(message, 1000, log=_log, where="control socket /x.sock")
    assert "control socket /x.sock: cannot encode" in caplog.text


def test_an_error_line_names_its_kind_only_when_given() -> None:
    assert error_line("no") == b'{"ok":false,"error":"no"}\n'
    assert json.loads(error_line("bad", "usage")) == {"ok": False, "error": "bad", "kind": "usage"}
    assert list(json.loads(error_line("bad", "usage"))) == ["ok", "error", "kind"]
