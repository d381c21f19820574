"""OAuth 2.0 access tokens for the mail accounts, from the libraries made for them, one per account and process.

Microsoft 365 (Exchange Online, app-only): msal's confidential client, the client credentials grant with
a client secret or a certificate. Google Workspace: google-auth's service account credentials with
domain-wide delegation to the mailbox. Any other provider: the standard client credentials grant at a
token URL, with Authlib's client. Static: a connection's ``access_token`` as the SMTP provider takes it
(it lives about an hour: for a trial, not for nights).

A source is made once per process and connection (and made again when the connection's settings
change); each keeps its library's own token cache, so a token is reused until shortly before it
expires (msal: more than 5 minutes left; google-auth: its refresh threshold; the others: half their
life or 5 minutes) and fetched again after that. Three outcomes, each naming the connection, never a
secret: a :class:`Token`; :class:`TokenUnavailable` (the endpoint is unreachable or answered 5xx: try
again later); :class:`TokenRefused` (the provider refused, and no retry can mend it). Settings that
cannot make a token at all are :class:`OAuthConfigError`, said before anything is asked.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC

from include.invoice_mailing.oauth_settings import (
    GOOGLE,
    MICROSOFT,
    OTHER,
    STATIC,
    OAuthConfigError,
    OAuthSettings,
)

# A session renews its login when its token has less than this left, or a quarter of its life when it
# was issued for less: the next transaction then starts on a new session with a new token.
SESSION_MARGIN = 60.0
# Our own cache (the client credentials grant of other providers) keeps a token while it has more than this.
REUSE_MARGIN = 300.0

__all__ = ["OAuthConfigError", "Token", "TokenRefused", "TokenSource", "TokenUnavailable", "token_source",
           "xoauth2", "oauthbearer"]


class TokenUnavailable(Exception):
    """The token endpoint did not answer, or answered 5xx: the deliveries stay pending; Airflow retries."""


class TokenRefused(Exception):
    """The identity provider refused the credentials (wrong secret, unknown tenant or app, consent missing):
    no retry mends it. The message is one line: the connection, the provider and its own words."""


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float          # seconds since the epoch; inf when the provider did not say
    issued_at: float

    def renew_at(self) -> float:
        """When a session logged in with this token should log in again with a new one."""
        if math.isinf(self.expires_at):
            return math.inf
        return self.expires_at - min(SESSION_MARGIN, (self.expires_at - self.issued_at) / 4)


class TokenSource(ABC):
    """Tokens for one connection. ``provider`` names who issues them, for errors and the check."""

    provider: str = "the token endpoint"

    def __init__(self, settings: OAuthSettings):
        self.settings = settings
        self._lock = threading.Lock()

    @property
    def conn_id(self) -> str:
        return self.settings.conn_id

    def token(self) -> Token:
        with self._lock:
            return self._token()

    @abstractmethod
    def _token(self) -> Token: ...

    def refused(self, words: str) -> TokenRefused:
        return TokenRefused(f"{self.provider} refused the token request of connection {self.conn_id!r}: "
                            f"{_first_line(words)}{_hint(words)}")

    def unavailable(self, exc: BaseException | str) -> TokenUnavailable:
        what = exc if isinstance(exc, str) else f"{type(exc).__name__}: {_first_line(str(exc))}"
        return TokenUnavailable(f"{self.provider} did not answer the token request of connection "
                                f"{self.conn_id!r} ({what}); the deliveries stay pending and are sent later")

    def __repr__(self) -> str:  # never the secret
        return f"<{type(self).__name__} for {self.conn_id!r}>"


class StaticToken(TokenSource):
    provider = "the connection's access_token"

    def _token(self) -> Token:
        return Token(self.settings.access_token, math.inf, time.time())


class MicrosoftTokens(TokenSource):
    """msal's ConfidentialClientApplication: its token cache lives as long as the source."""

    provider = "Microsoft Entra ID"

    def __init__(self, settings: OAuthSettings):
        super().__init__(settings)
        self._app = None

    def _application(self):
        import msal
        import requests

        if self._app is None:
            s = self.settings
            known = s.authority_host in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS
            try:  # msal reads the tenant's OpenID configuration here: the first network call
                self._app = msal.ConfidentialClientApplication(
                    s.client_id, client_credential=s.msal_credential(), authority=f"{s.authority}/{s.tenant_id}",
                    instance_discovery=None if known else False, validate_authority=known)
            except (requests.RequestException, msal.exceptions.MsalServiceError) as exc:  # unreachable, or 5xx
                raise self.unavailable(exc) from None
            except ValueError as exc:  # the discovery's 4xx (an unknown tenant), or an unusable key
                raise self.refused(_discovery_words(exc, s.tenant_id)) from None
        return self._app

    def _token(self) -> Token:
        import msal
        import requests

        app = self._application()
        try:
            result = app.acquire_token_for_client(scopes=[self.settings.scope])
        except (requests.RequestException, msal.exceptions.MsalServiceError) as exc:  # unreachable, or a 5xx
            raise self.unavailable(exc) from None
        if "access_token" in result:
            now = time.time()
            return Token(result["access_token"], now + float(result.get("expires_in", 3600)), now)
        error = result.get("error", "error")
        words = f"{error}: {result.get('error_description') or ''}".strip()
        if error in ("temporarily_unavailable", "server_error"):
            raise self.unavailable(_first_line(words))
        raise self.refused(words)


class GoogleTokens(TokenSource):
    """google-auth's service account credentials for the mailbox (domain-wide delegation)."""

    provider = "Google"

    def __init__(self, settings: OAuthSettings):
        super().__init__(settings)
        from google.oauth2 import service_account

        try:
            self._credentials = service_account.Credentials.from_service_account_info(
                settings.service_account, scopes=[settings.scope], subject=settings.subject)
        except (ValueError, KeyError) as exc:
            raise OAuthConfigError(f"the connection {settings.conn_id!r} has a service account key google-auth "
                                   f"cannot use ({type(exc).__name__}: {_first_line(str(exc))}): paste the key "
                                   "file Google's console downloaded, unchanged") from None

    def _token(self) -> Token:
        from google.auth import exceptions
        from google.auth.transport.requests import Request

        creds = self._credentials
        if not creds.valid:
            try:
                creds.refresh(Request())
            except exceptions.RefreshError as exc:
                words = str(exc.args[0]) if exc.args else str(exc)
                raise (self.unavailable(_first_line(words)) if exc.retryable else self.refused(words)) from None
            except exceptions.TransportError as exc:
                raise self.unavailable(exc) from None
        now = time.time()
        expires = creds.expiry.replace(tzinfo=UTC).timestamp() if creds.expiry else now + 3600  # naive UTC
        return Token(creds.token, expires, now)


class ClientCredentialsTokens(TokenSource):
    """Any other provider: RFC 6749's client credentials grant at the connection's token URL (Authlib)."""

    def __init__(self, settings: OAuthSettings):
        super().__init__(settings)
        self.provider = f"the token endpoint {settings.token_url}"
        self._cached: Token | None = None

    def _token(self) -> Token:
        import requests
        from authlib.integrations.base_client import OAuthError
        from authlib.integrations.requests_client import OAuth2Session

        now = time.time()
        if self._cached and self._cached.expires_at - now > min(REUSE_MARGIN,
                                                                (self._cached.expires_at - self._cached.issued_at) / 2):
            return self._cached
        s = self.settings
        with OAuth2Session(s.client_id, s.client_secret, scope=s.scope or None,
                           token_endpoint_auth_method=s.token_auth_method) as session:
            try:
                answer = session.fetch_token(s.token_url, grant_type="client_credentials", timeout=30,
                                             **({"audience": s.audience} if s.audience else {}))
            except OAuthError as exc:
                words = f"{exc.error}: {exc.description or ''}".strip()
                if exc.error in ("temporarily_unavailable", "server_error"):
                    raise self.unavailable(_first_line(words)) from None
                raise self.refused(words) from None
            except requests.RequestException as exc:
                raise self.unavailable(exc) from None
        expires = float(answer.get("expires_at") or now + float(answer.get("expires_in") or 3600))
        self._cached = Token(answer["access_token"], expires, now)
        return self._cached


_SOURCES: dict[str, TokenSource] = {}
_SOURCES_LOCK = threading.Lock()
_KINDS = {STATIC: StaticToken, MICROSOFT: MicrosoftTokens, GOOGLE: GoogleTokens, OTHER: ClientCredentialsTokens}


def token_source(conn_id: str, *, login: str | None, password: str | None, extra: dict) -> TokenSource:
    """The connection's token source, made once per process and settings; OAuthConfigError when the
    settings cannot make one (one line naming the connection and what is missing)."""
    settings = OAuthSettings.parse(conn_id, login=login, password=password, extra=extra)
    key = f"{conn_id}\x00{_fingerprint(settings)}"
    with _SOURCES_LOCK:
        if key not in _SOURCES:
            for stale in [k for k in _SOURCES if k.split("\x00")[0] == conn_id]:
                del _SOURCES[stale]  # the connection changed: its old tokens are not the new settings'
            _SOURCES[key] = _KINDS[settings.kind](settings)
        return _SOURCES[key]


def forget_sources() -> None:
    """Drop every source and its cached tokens (a new process starts so)."""
    with _SOURCES_LOCK:
        _SOURCES.clear()


def xoauth2(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial response (Google's and Microsoft's format), for SMTP AUTH and IMAP AUTHENTICATE."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The SASL OAUTHBEARER initial response (RFC 7628): a GS2 header naming the user, then key/value pairs."""
    name = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={name},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"


def _fingerprint(settings: OAuthSettings) -> str:
    return hashlib.sha256(json.dumps(settings.identity(), sort_keys=True, default=str).encode()).hexdigest()


def _first_line(text: str) -> str:
    """The provider's words on one line: Entra's descriptions go on with trace and correlation ids."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return re.sub(r"\s+", " ", line)[:400]


# What the administrator must change, for Entra ID's commonest refusals (its AADSTS codes).
_AADSTS_HINTS = {
    "7000215": "put the client secret's value (not its ID) in the connection's password",
    "7000222": "the client secret has expired: make a new one in the app registration and put it in the connection",
    "700016": "check the connection's client_id (the application ID) and tenant_id (the directory ID)",
    "90002": "check the connection's tenant_id (the directory ID of the app registration)",
    "700027": "the certificate in the connection is not the one uploaded to the app registration, or not its key",
    "65001": "an administrator must grant consent to the app's Exchange Online permissions",
    "1002012": "the scope must end in /.default, e.g. https://outlook.office365.com/.default",
}


def _hint(words: str) -> str:
    found = re.search(r"AADSTS(\d+)", words)
    hint = _AADSTS_HINTS.get(found.group(1)) if found else None
    return f" ({hint})" if hint else ""


def _discovery_words(exc: ValueError, tenant: str) -> str:
    """msal's ValueError of a failed tenant discovery hides Entra's answer in its cause: bring it back."""
    for error in (exc.__cause__, exc.__context__, exc):
        text = str(error) if error else ""
        found = re.search(r"\{.*\}", text, re.S)
        if found:
            try:
                answer = json.loads(found.group(0))
                return f"{answer.get('error', 'error')}: {answer.get('error_description', '')}"
            except ValueError:
                pass
    return f"the tenant {tenant!r} could not be used: {_first_line(str(exc))}"

