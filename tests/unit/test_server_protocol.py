"""Wire types, error mapping and server config: no model, no sockets."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from slmserve.cli import build_parser
from slmserve.config import ConfigError
from slmserve.engine import EngineClosedError, QueueFullError
from slmserve.plugins import PluginManager
from slmserve.server import ServerConfig, load_server_config
from slmserve.server.errors import APIError, from_exception
from slmserve.server.protocol import (
    CHAT_DECODER,
    COMPLETION_DECODER,
    ENCODER,
    ChatChunkChoice,
    Delta,
)


def test_unknown_request_fields_are_ignored() -> None:
    req = COMPLETION_DECODER.decode(
        b'{"prompt": "hi", "frobnicate": 1, "stream_options": {"include_usage": true, "x": 2}}'
    )
    assert req.prompt == "hi" and req.stream_options is not None
    assert req.stream_options.include_usage


@pytest.mark.parametrize(
    "prompt", ['"text"', '["a", "b"]', "[1, 2, 3]", "[[1, 2], [3]]", '["mixed", 1]']
)
def test_every_prompt_shape_decodes(prompt: str) -> None:
    # Shape mixing is rejected later with a clearer message than a union error.
    assert COMPLETION_DECODER.decode(f'{{"prompt": {prompt}}}'.encode()).prompt is not None


def test_chat_content_parts() -> None:
    req = CHAT_DECODER.decode(
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},'
        b' {"role": "assistant", "content": null}]}'
    )
    first = req.messages[0].content
    assert isinstance(first, list) and first[0].text == "hi"
    assert req.messages[1].content is None


def test_stream_delta_omits_unset_fields() -> None:
    encoded = ENCODER.encode(ChatChunkChoice(index=0, delta=Delta()))
    assert msgspec.json.decode(encoded)["delta"] == {}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
        (
            b'{"prompt": "x", "stream_options": {"include_usage": 1}}',
            "stream_options.include_usage",
        ),
        (b'{"prompt": "x", "stop": ["ok", ""]}', "stop[1]"),
    ],
)
def test_validation_errors_name_the_field(body: bytes, param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        COMPLETION_DECODER.decode(body)
    error = from_exception(info.value)
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")
    assert param.split("[")[0].split(".")[0] in error.message


def test_exception_mapping() -> None:
    assert from_exception(msgspec.DecodeError("JSON is malformed")).status == 400
    assert from_exception(QueueFullError("full")).status == 429
    assert from_exception(QueueFullError("full")).code == "queue_full"
    assert from_exception(EngineClosedError("closed")).status == 503
    assert from_exception(web.HTTPNotFound()).status == 404
    assert from_exception(web.HTTPRequestEntityTooLarge(10, 20)).code == "request_too_large"
    hidden = from_exception(RuntimeError("internal detail"))
    assert hidden.status == 500 and "internal detail" not in hidden.message
    mine = APIError(401, "no", code="invalid_api_key")
    assert from_exception(mine) is mine and mine.type == "authentication_error"


def test_server_config_layers(tmp_path: Path) -> None:
    path = tmp_path / "slmserve.toml"
    path.write_text('[engine]\nkv_tokens = 512\n\n[server]\nport = 9000\napi_key = "from-file"\n')
    assert load_server_config(path, environ={}).port == 9000
    assert load_server_config(path, environ={}).api_key == "from-file"
    env = {"SLMSERVE_API_KEY": "from-env"}
    assert load_server_config(path, environ=env).api_key == "from-env"
    flags = load_server_config(path, {"api_key": "from-flag", "port": None}, environ=env)
    assert flags.api_key == "from-flag" and flags.port == 9000
    assert ServerConfig().replace(port=0).port == 0


def test_server_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"port"):
        load_server_config(overrides={"port": 70000}, environ={})
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="unknown field `prot`"):
        load_server_config(path, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_server_config(tmp_path / "missing.toml", environ={})


def test_serve_command_flags() -> None:
    parser, handlers = build_parser(PluginManager(load_entrypoints=False))
    args = parser.parse_args(
        ["serve", "--port", "0", "--api-key", "k", "--scheduler", "vtc", "--kv-tokens", "64"]
    )
    assert args.command == "serve" and "serve" in handlers
    assert (args.port, args.api_key, args.scheduler, args.kv_tokens) == (0, "k", "vtc", 64)
    assert args.host is None and args.loop == "auto"


def test_engine_cpus_parse_and_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    from slmserve.server.config import parse_cpus

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert parse_cpus("1") == {1}
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
    with pytest.raises(ConfigError, match="not a CPU list"):
        parse_cpus("one")
    with pytest.raises(ConfigError, match="outside 0-7"):
        parse_cpus("6-9")
    with pytest.raises(ConfigError, match="leaves no CPU for the HTTP front"):
        parse_cpus("0-7")
