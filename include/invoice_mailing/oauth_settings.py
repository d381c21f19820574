"""What an Airflow connection with ``auth_type: oauth2`` says about its tokens, read and refused once, at the edge.

The same keys for the SMTP connection of an email account and the IMAP connection ``mailing_bounces``
(the SMTP provider's own names kept: ``client_id``, ``client_secret``, ``tenant_id``, ``scope``,
``access_token``). Secrets go where Airflow masks them: the connection's password, or an extra key
whose name Airflow treats as sensitive (``client_secret``, ``private_key``, ``keyfile_dict``,
``access_token``). Nothing here reaches the network; docs/mail-accounts.md shows each as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MICROSOFT, GOOGLE, OTHER, STATIC = "microsoft", "google", "client_credentials", "static"
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
GOOGLE_SCOPE = "https://mail.google.com/"
DOCS = "docs/mail-accounts.md"
_SHARED_TENANTS = ("common", "organizations", "consumers")


class OAuthConfigError(ValueError):
    """The connection's settings cannot make a token: one line naming the connection and what to change."""


@dataclass(frozen=True)
class OAuthSettings:
    conn_id: str
    kind: str                      # MICROSOFT, GOOGLE, OTHER or STATIC
    user: str                      # the mailbox the session logs in as (XOAUTH2's user)
    scope: str = ""
    access_token: str | None = field(default=None, repr=False)
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    private_key_passphrase: str | None = field(default=None, repr=False)
    certificate: str | None = None       # PEM: msal signs PS256 and names it (x5t#S256, x5c)
    thumbprint: str | None = None        # SHA-1 hex, as the Azure portal shows it: msal signs RS256 (x5t)
    authority: str = MICROSOFT_AUTHORITY
    service_account: dict | None = field(default=None, repr=False)
    token_url: str | None = None
    token_auth_method: str = "client_secret_basic"
    audience: str | None = None

    @property
    def authority_host(self) -> str:
        return urlsplit(self.authority).hostname or ""

    @property
    def subject(self) -> str:
        return self.user

    def msal_credential(self):
        """msal's ``client_credential``: the secret, or the certificate's key with the certificate or its thumbprint."""
        if self.private_key is None:
            return self.client_secret
        credential = {"private_key": self.private_key}
        if self.private_key_passphrase:
            credential["passphrase"] = self.private_key_passphrase
        if self.certificate:
            credential["public_certificate"] = self.certificate
        else:
            credential["thumbprint"] = self.thumbprint
        return credential

    def identity(self) -> dict:
        """Everything that makes the tokens what they are (hashed, to notice a changed connection)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def parse(cls, conn_id: str, *, login: str | None, password: str | None, extra: dict) -> OAuthSettings:
        kind = _kind(conn_id, password, extra)
        user = (login or extra.get("from_email") or "").strip()
        where = f"the connection {conn_id!r}"
        if kind == STATIC:
            _require(where, user, "a login (the mailbox the token is for)")
            return cls(conn_id, STATIC, user, access_token=str(extra["access_token"]))
        if kind == MICROSOFT:
            return _microsoft(cls, conn_id, where, user, password, extra)
        if kind == GOOGLE:
            subject = (extra.get("subject") or user).strip()
            _require(where, subject, "a login or extra subject (the mailbox the service account acts for)")
            return cls(conn_id, GOOGLE, subject, scope=extra.get("scope") or GOOGLE_SCOPE,
                       service_account=_service_account(where, password, extra))
        token_url = str(extra.get("token_url") or "")
        if urlsplit(token_url).scheme != "https":
            raise OAuthConfigError(f"{where} has token_url {token_url!r}: the token endpoint's https:// URL")
        method = extra.get("token_auth_method") or "client_secret_basic"
        if method not in ("client_secret_basic", "client_secret_post"):
            raise OAuthConfigError(f"{where} has token_auth_method {method!r}: client_secret_basic or "
                                   "client_secret_post")
        secret = password or extra.get("client_secret")
        _require(where, user, "a login (the mailbox to log in as)")
        _require(where, extra.get("client_id"), "a client_id in its extra")
        _require(where, secret, "the client secret as its password (or client_secret in its extra)")
        return cls(conn_id, OTHER, user, scope=extra.get("scope") or "", client_id=str(extra["client_id"]),
                   client_secret=secret, token_url=token_url, token_auth_method=method,
                   audience=extra.get("audience"))


def _kind(conn_id: str, password: str | None, extra: dict) -> str:
    named = extra.get("oauth_provider")
    if named:
        if named not in (MICROSOFT, GOOGLE, OTHER):
            raise OAuthConfigError(f"the connection {conn_id!r} has oauth_provider {named!r}: it may be "
                                   f"{MICROSOFT!r}, {GOOGLE!r} or {OTHER!r}")
        return named
    if extra.get("access_token"):
        return STATIC
    if extra.get("token_url"):
        return OTHER
    if extra.get("keyfile_dict") or extra.get("key_path") or (password or "").lstrip().startswith("{"):
        return GOOGLE
    if extra.get("tenant_id") or extra.get("client_id"):
        return MICROSOFT
    raise OAuthConfigError(
        f"the connection {conn_id!r} has auth_type oauth2 but neither an access_token nor client credentials "
        "in its extra: for Microsoft 365 tenant_id and client_id, with the app's client secret as the "
        "password; for Google Workspace the service account's key file as the password "
        f"(see {DOCS})")


def _microsoft(cls, conn_id: str, where: str, user: str, password: str | None, extra: dict) -> OAuthSettings:
    tenant, client_id = str(extra.get("tenant_id") or "").strip(), str(extra.get("client_id") or "").strip()
    _require(where, user, "a login (the mailbox to send as, e.g. ar@company.no)")
    _require(where, tenant, "a tenant_id in its extra (the directory (tenant) ID of the app registration)")
    if tenant.lower() in _SHARED_TENANTS:
        raise OAuthConfigError(f"{where} has tenant_id {tenant!r}: an app that signs in as itself needs its "
                               "own tenant's ID (the directory ID), not a shared one")
    _require(where, client_id, "a client_id in its extra (the application (client) ID)")
    authority = str(extra.get("authority") or MICROSOFT_AUTHORITY).rstrip("/")
    if urlsplit(authority).scheme != "https" or not urlsplit(authority).hostname:
        raise OAuthConfigError(f"{where} has authority {authority!r}: an https:// URL such as {MICROSOFT_AUTHORITY}")
    common = dict(tenant_id=tenant, client_id=client_id, authority=authority,
                  scope=extra.get("scope") or MICROSOFT_SCOPE)
    key = extra.get("private_key")
    if key or extra.get("certificate") or extra.get("certificate_thumbprint"):
        passphrase = extra.get("private_key_passphrase")
        certificate, thumbprint = _certificate(where, key, passphrase, extra)
        return cls(conn_id, MICROSOFT, user, private_key=key, private_key_passphrase=passphrase,
                   certificate=certificate, thumbprint=thumbprint, **common)
    secret = password or extra.get("client_secret")
    _require(where, secret, "the app's client secret as its password (or a certificate: certificate and "
                            "private_key in its extra)")
    return cls(conn_id, MICROSOFT, user, client_secret=secret, **common)


def _certificate(where: str, key: str | None, passphrase: str | None, extra: dict) -> tuple[str | None, str | None]:
    """(certificate PEM, thumbprint): the certificate checked against its private key before any request."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    _require(where, key, "a private_key (PEM) in its extra, beside the certificate")
    try:
        private = serialization.load_pem_private_key(key.encode(), passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        raise OAuthConfigError(f"{where} has a private_key that is not a usable PEM private key "
                               f"({_why(exc)})") from None
    pem = extra.get("certificate")
    if pem:
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            raise OAuthConfigError(f"{where} has a certificate that is not a PEM certificate") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if (cert.public_key().public_bytes(serialization.Encoding.DER, public)
                != private.public_key().public_bytes(serialization.Encoding.DER, public)):
            raise OAuthConfigError(f"{where} has a certificate that does not match its private_key: they must be "
                                   "the pair uploaded to the app registration")
        return pem, None
    thumbprint = str(extra.get("certificate_thumbprint") or "").replace(":", "").strip()
    if len(thumbprint) != 40 or any(c not in "0123456789abcdefABCDEF" for c in thumbprint):
        raise OAuthConfigError(f"{where} needs the certificate (PEM) or its certificate_thumbprint (the 40 "
                               "hexadecimal digits the app registration shows) beside its private_key")
    return None, thumbprint


def _service_account(where: str, password: str | None, extra: dict) -> dict:
    """The service account's key file, from extra keyfile_dict, a key_path on the workers, or the password."""
    source, raw = "the password", password
    if extra.get("keyfile_dict"):
        source, raw = "keyfile_dict", extra["keyfile_dict"]
    elif extra.get("key_path"):
        source = f"the key file {extra['key_path']}"
        try:
            raw = Path(extra["key_path"]).read_text()
        except OSError as exc:
            raise OAuthConfigError(f"{where} names key_path {extra['key_path']!r}, which cannot be read "
                                   f"({_why(exc)})") from None
    if isinstance(raw, dict):
        info = raw
    else:
        try:
            info = json.loads(raw or "")
        except ValueError:
            raise OAuthConfigError(f"{where}: the service account key in {source} is not JSON: paste the whole key "
                                   'file Google\'s console downloaded (it starts with {"type": "service_account")') from None
    if not isinstance(info, dict) or info.get("type") != "service_account" or not info.get("private_key") \
            or not info.get("client_email"):
        raise OAuthConfigError(f"{where}: the JSON in {source} is not a service account key (it needs type "
                               "service_account, client_email and private_key)")
    return info


def _require(where: str, value, what: str) -> None:
    if not value:
        raise OAuthConfigError(f"{where} has auth_type oauth2 but no {what}")


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
