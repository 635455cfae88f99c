"""serve.yaml and flags -> ServeConfig: destinations, AE titles, unknown keys, flags winning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ichdet.cli import app
from ichdet.errors import ConfigError
from ichdet.serve import Spool
from ichdet.serve.config import (
    Destination,
    HL7Receiver,
    WebDestination,
    load_serve_config,
    parse_destination,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("PACS@127.0.0.1:4242", Destination(ae_title="PACS", host="127.0.0.1", port=4242)),
    (" ORTHANC@pacs.example.org:104 ", Destination(ae_title="ORTHANC", host="pacs.example.org", port=104)),
    ("https://pacs.example.org/dicom-web", WebDestination(url="https://pacs.example.org/dicom-web")),
    ("http://127.0.0.1:8042/dicom-web", WebDestination(url="http://127.0.0.1:8042/dicom-web")),
])
def test_parse_destination(text: str, expected: Destination | WebDestination) -> None:
    assert parse_destination(text) == expected
    assert str(parse_destination(text)) == text.strip()


@pytest.mark.parametrize(("text", "match"), [
    ("PACS@host", r"expected AE@HOST:PORT"),
    ("127.0.0.1:104", r"expected AE@HOST:PORT"),
    ("PACS@host:0", r"send_to 'PACS@host:0': Input should be greater than or equal to 1"),
    ("A_VERY_LONG_AE_TITLE@host:104", r"is not an AE title"),
])
def test_parse_destination_refuses(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_destination(text)


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("bundle: model.ichdet\nspool: spool\nallow: [ORTHANC]\nport: 104\nsend-to: PACS@10.0.0.5:104\n"
                    "quiet_seconds: 30\n")
    cfg = load_serve_config(path, {"port": 11112, "allow": None, "quiet_seconds": None})
    assert cfg.bundle == tmp_path / "model.ichdet"  # relative to the file
    assert cfg.spool == tmp_path / "spool"
    assert (cfg.port, cfg.allow, cfg.quiet_seconds) == (11112, ["ORTHANC"], 30.0)
    assert cfg.send_to == Destination(ae_title="PACS", host="10.0.0.5", port=104)
    assert cfg.ae_title == "ICHDET"


@pytest.mark.parametrize(("text", "overrides", "match"), [
    ("bundle: b\nspool: s\nallow: [A]\nquiet: 3\n", {}, r"serve.yaml: quiet: Extra inputs are not permitted"),
    ("bundle: b\nspool: s\n", {}, r"serve.yaml: allow: Field required"),
    ("bundle: b\nspool: s\nallow: []\n", {}, r"allow: List should have at least 1 item"),
    ("bundle: b\nspool: s\nallow: [A]\n", {"port": 70000}, r"port: Input should be less than or equal to 65535"),
    ("bundle: b\nspool: s\nallow: ['BAD\\\\AE']\n", {}, r"is not an AE title"),
    ("- a list\n", {}, r"expected a mapping of settings, got list"),
    ("bundle: [unclosed\n", {}, r"cannot read the serve config"),
    ("bundle: b\nspool: s\nallow: [A]\ntls_cert: c.pem\n", {},
     r"serve.yaml: config: tls_cert and tls_key go together \(the node's certificate and its private key\)"),
    ("bundle: b\nspool: s\nallow: [A]\ntls_ca: ca.pem\n", {},
     r"config: tls_ca needs tls_cert and tls_key: callers are checked only over TLS"),
    ("bundle: b\nspool: s\nallow: [A]\nsend_tls: true\n", {}, r"config: send_tls needs send_to"),
])
def test_bad_config(tmp_path: Path, text: str, overrides: dict[str, object], match: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_serve_config(path, overrides)


def test_tls_paths_relative_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "deploy" / "serve.yaml"
    path.parent.mkdir()
    path.write_text("bundle: b\nspool: s\nallow: [A]\ntls_cert: tls/node.pem\ntls_key: tls/node.key\n"
                    "tls_ca: /etc/ca.pem\n")
    cfg = load_serve_config(path, {})
    tls = path.parent / "tls"
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (tls / "node.pem", tls / "node.key", Path("/etc/ca.pem"))


def test_flags_alone() -> None:
    cfg = load_serve_config(None, {"bundle": Path("b"), "spool": Path("s"), "allow": ["ORTHANC", "CT01"]})
    assert (cfg.port, cfg.quiet_seconds, cfg.send_to, cfg.max_age_days) == (11112, 10.0, None, None)


def test_example_config_is_valid() -> None:
    cfg = load_serve_config(Path(__file__).parents[2] / "deploy" / "serve.yaml", {})
    assert cfg.allow and cfg.send_to is not None


@pytest.mark.parametrize(("args", "match"), [
    (["--spool", "s", "--allow", "ORTHANC"], "bundle: Field required"),
    (["--bundle", "b", "--spool", "s"], "allow: Field required"),
    (["--bundle", "b", "--spool", "s", "--allow", "ORTHANC", "--send-to", "PACS:104"], "expected AE@HOST:PORT"),
    (["--config", "missing.yaml"], "missing.yaml: cannot read the serve config"),
])
def test_serve_command_refuses_bad_settings(args: list[str], match: str) -> None:
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert match in result.output


def test_serve_status_command(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store("1.2.3", "1.2.3.4", b"instance")
    spool.quarantine(b"not dicom", "cannot parse the data set")
    result = CliRunner().invoke(app, ["serve", "--status", "--spool", str(tmp_path / "spool")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"studies": 1, "receiving": 0, "waiting_analysis": 1, "analysed": 0,
                                         "failed": 0, "instances": 1, "pending_sends": 0, "quarantined": 1,
                                         "outbox": 0, "empty_study_folders": 0,
                                         "pending_notifications": {"hl7": 0, "fhir": 0},
                                         "failed_notifications": {"hl7": 0, "fhir": 0}}


@pytest.mark.parametrize(("settings", "env", "auth"), [
    ({}, {}, (None, None, None)),
    ({}, {"ICHDET_DICOMWEB_TOKEN": "env-token"}, ("env-token", None, None)),
    ({"dicomweb_user": "node", "dicomweb_password": "cfg-pw"}, {"ICHDET_DICOMWEB_TOKEN": "env-token"},
     (None, "node", "cfg-pw")),  # the config's credentials win over the environment's
    ({"dicomweb_token": "cfg-token"}, {}, ("cfg-token", None, None)),
])
def test_dicomweb_credentials_config_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     settings: dict[str, str], env: dict[str, str],
                                                     auth: tuple[str | None, ...]) -> None:
    for key in ("ICHDET_DICOMWEB_TOKEN", "ICHDET_DICOMWEB_USER", "ICHDET_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"bundle": "m.ichdet", "spool": "spool", "allow": ["A"],
                                      "send_to": "http://pacs/dicom-web", **settings}))
    cfg = load_serve_config(config, {})
    found = cfg.web_auth()
    assert (found.token, found.user, found.password) == auth
    assert "cfg-pw" not in repr(cfg) and "cfg-token" not in repr(cfg)  # secrets stay out of reprs and logs


def test_notify_and_ca_settings(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"bundle": "m.ichdet", "spool": "spool", "allow": ["A"], "ca_bundle": "ca.pem",
                                      "notify_hl7": "ris.example.org:2575",
                                      "notify_url": "https://fhir.example.org/fhir/DiagnosticReport"}))
    cfg = load_serve_config(config, {})
    assert cfg.notify_hl7 == HL7Receiver(host="ris.example.org", port=2575)
    assert cfg.notify_url == "https://fhir.example.org/fhir/DiagnosticReport"
    assert cfg.ca_bundle == tmp_path / "ca.pem"  # relative to the config file
    with pytest.raises(ConfigError, match=r"ca_bundle: .*missing\.pem: no such file"):
        load_serve_config(config, {"ca_bundle": tmp_path / "missing.pem"})
