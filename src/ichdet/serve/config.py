"""The node's settings: one pydantic model filled from ``serve.yaml`` and then from command-line flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ichdet.dicom.web import WebAuth, is_web_url, parse_base_url
from ichdet.errors import ConfigError, IchdetError

__all__ = ["Destination", "HL7Receiver", "ServeConfig", "WebDestination", "load_serve_config", "parse_destination",
           "parse_hl7_receiver"]

#: An application entity title: 1-16 characters of the default repertoire, no backslash or control codes.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return value.strip()


class Destination(BaseModel):
    """Where results go by C-STORE: ``AE@HOST:PORT``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class WebDestination(BaseModel):
    """Where results go by STOW-RS: a DICOMweb base URL (``http(s)://HOST[:PORT]/path``, no credentials in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str

    def __str__(self) -> str:
        return self.url


class HL7Receiver(BaseModel):
    """Where HL7 notifications go over MLLP: ``HOST:PORT``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_hl7_receiver(text: str) -> HL7Receiver:
    """``"ris.local:2575"`` -> :class:`HL7Receiver`; a :class:`ConfigError` naming the fix otherwise."""
    match = re.fullmatch(r"([^:@/\s]+):(\d+)", text.strip())
    if not match or not 1 <= int(match[2]) <= 65535:
        raise ConfigError(f"notify_hl7 {text!r}: expected HOST:PORT of the RIS's MLLP listener, e.g. 127.0.0.1:2575")
    return HL7Receiver(host=match[1], port=int(match[2]))


def parse_destination(text: str) -> Destination | WebDestination:
    """``"PACS@10.0.0.5:104"`` -> :class:`Destination`, ``"https://pacs/dicom-web"`` -> :class:`WebDestination`;
    a :class:`ConfigError` naming the fix otherwise."""
    if is_web_url(text.strip()):
        try:
            return WebDestination(url=parse_base_url(text.strip(), "send_to"))
        except IchdetError as err:
            raise ConfigError(str(err)) from None
    match = re.fullmatch(r"([^@]+)@([^:@]+):(\d+)", text.strip())
    if not match:
        raise ConfigError(f"send_to {text!r}: expected AE@HOST:PORT, e.g. PACS@127.0.0.1:4242, or a DICOMweb "
                          "base URL, e.g. http://pacs:8042/dicom-web")
    try:
        return Destination(ae_title=match[1], host=match[2], port=int(match[3]))
    except ValidationError as err:
        raise ConfigError(f"send_to {text!r}: {err.errors()[0]['msg']}") from None


class ServeConfig(BaseModel):
    """Everything ``ichdet serve`` needs; the same keys in ``serve.yaml`` and as flags (flags win)."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path
    spool: Path
    ae_title: str = "ICHDET"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allow: list[str] = Field(min_length=1)
    send_to: Destination | WebDestination | None = None
    # DICOMweb (send_to a URL): credentials here or in ICHDET_DICOMWEB_TOKEN / _USER / _PASSWORD
    dicomweb_token: SecretStr | None = None
    dicomweb_user: str | None = None
    dicomweb_password: SecretStr | None = None
    ca_bundle: Path | None = None  # PEM file of a private CA for https (DICOMweb and FHIR)
    notify_hl7: HL7Receiver | None = None  # HL7 v2.5 ORU^R01 over MLLP per analysed study generation
    notify_url: str | None = None  # FHIR R4 DiagnosticReport POSTed per analysed study generation
    quiet_seconds: float = Field(10.0, gt=0, le=3600)
    max_age_days: float | None = Field(None, gt=0)
    status_port: int | None = Field(None, ge=1, le=65535)
    device: str = "auto"
    tta: bool = True
    retry_initial_seconds: float = Field(5.0, gt=0)
    retry_max_seconds: float = Field(600.0, gt=0)
    tls_cert: Path | None = None  # PEM: this node's certificate; with tls_key, DICOM is served over TLS only
    tls_key: Path | None = None   # PEM: its private key (no passphrase)
    tls_ca: Path | None = None    # PEM: callers must present a certificate signed by this CA
    send_tls: bool = False        # send results over TLS: the destination's certificate checked against tls_ca

    @model_validator(mode="after")
    def _tls(self) -> ServeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (the node's certificate and its private key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key: callers are checked only over TLS")
        if self.send_tls and self.send_to is None:
            raise ValueError("send_tls needs send_to (the destination to reach over TLS)")
        if self.send_tls and isinstance(self.send_to, WebDestination):
            raise ValueError("send_tls is for a DICOM destination (AE@HOST:PORT); an https:// destination is "
                             "always verified (ca_bundle for a private CA)")
        return self

    @field_validator("ae_title")
    @classmethod
    def _own_ae(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("allow")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]

    @field_validator("send_to", mode="before")
    @classmethod
    def _dest(cls, value: Any) -> Any:
        return parse_destination(value) if isinstance(value, str) else value

    @field_validator("ca_bundle")
    @classmethod
    def _ca(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{value}: no such file; give the PEM file of the CA that signed the servers' "
                             "certificates")
        return value

    @field_validator("notify_hl7", mode="before")
    @classmethod
    def _hl7(cls, value: Any) -> Any:
        return parse_hl7_receiver(value) if isinstance(value, str) else value

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_base_url(value, "notify_url")
            except IchdetError as err:
                raise ValueError(str(err)) from None
        return value

    def web_auth(self) -> WebAuth:
        """The DICOMweb credentials: this config's, else the environment's (:meth:`WebAuth.from_env`)."""
        if self.dicomweb_token or self.dicomweb_user or self.dicomweb_password:
            return WebAuth(token=self.dicomweb_token.get_secret_value() if self.dicomweb_token else None,
                           user=self.dicomweb_user,
                           password=self.dicomweb_password.get_secret_value() if self.dicomweb_password else None,
                           ca_bundle=self.ca_bundle)
        return WebAuth.from_env(self.ca_bundle)


def load_serve_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """Read ``path`` (YAML, optional), apply the non-``None`` ``overrides`` (flags) on top, validate.

    Relative paths in the file are taken relative to the file's folder, so a deployment folder can move.

    Raises:
        ConfigError: unreadable YAML, an unknown key, or a value out of range (named, with the reason).
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the serve config ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
        for key in ("bundle", "spool", "tls_cert", "tls_key", "tls_ca", "ca_bundle"):
            if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                values[key] = Path(path).resolve().parent / values[key]
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    try:
        return ServeConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        source = f"{path}: " if path else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}{where}: {message} (see deploy/serve.yaml for every key)") from None
