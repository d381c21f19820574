"""A real OAuth 2.0 authorization server on 127.0.0.1 over HTTPS: the tests' Microsoft Entra ID and Google.

Built on Authlib's server side (RFC 6749's token endpoint and client credentials grant, RFC 7523's JWT
bearer grant and JWT client assertions) on Flask, with a certificate of ``dev/test_ca.py``. Authlib was
chosen over the npm mock servers because one maintained library covers the three ways the platforms
issue a token to a server, and checks what they check: a client secret; a certificate's signed client
assertion (msal's certificate credential: RS256 with ``x5t``, or PS256 with ``x5t#S256``); a service
account's signed assertion naming the mailbox it acts for (Google's domain-wide delegation). The
clients under test reach it through their own configuration only: msal through an authority on this
server, google-auth through the key file's ``token_uri``, Authlib's client through a token URL.

- Entra ID: ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and ``POST /{tenant}/oauth2/v2.0/token``
  (client credentials; a secret in the body or a certificate's assertion). Refusals carry Entra's
  AADSTS codes: unknown tenant (90002), unknown application (700016), wrong secret (7000215), expired
  or revoked credentials (7000222), a bad assertion (700027), a scope without ``/.default`` (1002012).
- Google: ``POST /google/token`` (the JWT bearer grant of a service account; the assertion's ``aud`` is
  ``https://oauth2.googleapis.com/token`` whatever the token URL, as google-auth sends it).
- Any other provider: ``POST /oauth2/token`` (client credentials, HTTP Basic or in the body).

Access tokens are JWTs signed RS256 with the server's key, no ``kid``: ``iss`` the server's URL, ``aud``
the scope's resource (``https://outlook.office365.com`` for ``https://outlook.office365.com/.default``),
``sub`` the mailbox the client was granted. The last is the tests' stand-in for what Exchange Online
keeps apart (``Add-MailboxPermission`` for the app's service principal): Dovecot, which checks the
token, compares ``sub`` with the login, so a token for another mailbox is refused by the mail server.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidClientError,
    InvalidGrantError,
    InvalidScopeError,
    UnauthorizedClientError,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion, JWTBearerGrant
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, g, jsonify, request
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry
from werkzeug.serving import make_server

from dev.test_ca import TestCA

GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"
GOOGLE_SCOPE = "https://mail.google.com/"
MICROSOFT_RESOURCE = "https://outlook.office365.com"
ENTRA, GOOGLE, OTHER = "entra", "google", "other"


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Client(ClientMixin):
    """An application registered with the server: Entra ID's app registration, Google's service account
    (its ``client_id`` is the service account's address), or another provider's client."""

    client_id: str
    door: str
    mailbox: str                      # the token's subject: the one mailbox this client may use
    tenant: str | None = None
    secret: str | None = None
    public_key: rsa.RSAPublicKey | None = None
    revoked: bool = False

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        return scope

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        if self.door == ENTRA:
            if self.revoked:
                raise InvalidClientError(description=f"AADSTS7000222: The provided client secret keys for app "
                                                     f"'{self.client_id}' are expired.")
            if not self.secret or client_secret != self.secret:
                raise InvalidClientError(description="AADSTS7000215: Invalid client secret provided. Ensure the "
                                                     "secret being sent in the request is the client secret value, "
                                                     f"not the client secret ID, for a secret added to app "
                                                     f"'{self.client_id}'.")
        return not self.revoked and self.secret is not None and client_secret == self.secret

    def check_endpoint_auth_method(self, method, endpoint):
        return method in {ENTRA: {"client_secret_post", "client_assertion_jwt"}, GOOGLE: set(),
                          OTHER: {"client_secret_basic", "client_secret_post"}}[self.door]

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == (JWTBearerGrant.GRANT_TYPE if self.door == GOOGLE else ClientCredentialsGrant.GRANT_TYPE)


@dataclass(frozen=True)
class Request:
    """One token request as the server answered it, for the tests to count."""

    door: str
    client_id: str | None
    status: int
    error: str | None = None


class _ClientCredentials(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "client_assertion_jwt"]


# msal's PS256 assertion carries the certificate itself (``x5c``): more than joserfc's default 512 bytes of header.
_ASSERTIONS = JWSRegistry(algorithms=["RS256", "PS256"])
_ASSERTIONS.max_header_length = 16384


class _EntraAssertion(JWTBearerClientAssertion):
    """msal's certificate credential: a JWT signed with the certificate's key, ``aud`` the token endpoint."""

    def __init__(self):
        super().__init__(validate_jti=True)
        self._seen: set[str] = set()

    def get_audiences(self):
        return [request.base_url]

    def validate_jti(self, claims, jti):
        if jti in self._seen:
            return False
        self._seen.add(jti)
        return True

    def resolve_client_public_key(self, client):
        if client.revoked or client.public_key is None:
            raise InvalidClientError(description="AADSTS700027: The certificate with identifier used to sign the "
                                                 "client assertion is not registered on application.")
        return RSAKey.import_key(client.public_key.public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))

    def extract_assertion(self, assertion: str):
        try:
            obj = jws.extract_compact(assertion.encode(), registry=_ASSERTIONS)
        except JoseError as exc:
            raise InvalidClientError(description="AADSTS50027: JWT token is invalid or malformed.") from exc
        return obj.headers(), json.loads(obj.payload)

    def process_assertion_claims(self, assertion, resolve_key):
        try:  # msal signs PS256 when it knows the certificate, RS256 with a SHA-1 thumbprint
            token = jwt.decode(assertion, resolve_key, registry=_ASSERTIONS)
        except JoseError as exc:
            raise InvalidClientError(description="AADSTS700027: Client assertion contains an invalid signature. "
                                                 f"[Reason - {exc.description}]") from exc
        self.verify_claims(token.claims)
        return token.claims


class _GoogleGrant(JWTBearerGrant):
    """A service account's assertion: ``iss`` its address, ``sub`` the mailbox, ``scope`` inside the JWT."""

    def resolve_issuer_client(self, issuer):
        client = self.server.clients.get(issuer)
        return client if client is not None and client.door == GOOGLE else None

    def resolve_client_public_key(self, client):
        if client.revoked:
            raise InvalidGrantError(description="Invalid JWT Signature.")
        return RSAKey.import_key(client.public_key.public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))

    def process_assertion_claims(self, assertion):
        claims = super().process_assertion_claims(assertion)
        g.scope = claims.get("scope")
        return claims

    def get_audiences(self):
        return [GOOGLE_AUDIENCE]

    def authenticate_user(self, subject):
        return subject

    def has_granted_permission(self, client, user):
        if user != client.mailbox or g.scope != GOOGLE_SCOPE:
            raise UnauthorizedClientError(description="Client is unauthorized to retrieve access tokens using this "
                                                      "method, or client not authorized for any of the scopes "
                                                      "requested.")
        return True


class _Server(AuthorizationServer):
    def __init__(self, app: Flask, owner: TokenServer):
        self.clients = owner.clients
        self.owner = owner
        super().__init__(app, query_client=self._query_client, save_token=lambda token, req: None)
        self.register_grant(_ClientCredentials)
        self.register_grant(_GoogleGrant)
        self.register_client_auth_method(_EntraAssertion.CLIENT_AUTH_METHOD, _EntraAssertion())
        self.register_token_generator("default", owner.access_token)

    def _query_client(self, client_id):
        client = self.clients.get(client_id)
        if g.door == ENTRA and (client is None or client.tenant != g.tenant):
            raise UnauthorizedClientError(description=f"AADSTS700016: Application with identifier '{client_id}' was "
                                                      f"not found in the directory '{g.tenant}'.")
        return client if client is not None and client.door == g.door else None

    def validate_requested_scope(self, scope):
        if g.door == ENTRA and not (scope or "").endswith("/.default"):
            raise InvalidScopeError(description=f"AADSTS1002012: The provided value for scope {scope} is not valid. "
                                                "Client credential flows must have a scope value with /.default "
                                                "suffixed to the resource identifier (application ID URI).")
        g.scope = g.get("scope") or scope


@dataclass
class TokenServer:
    """Start it, register clients, count the token requests; ``lifetime`` is the next tokens' (seconds)."""

    lifetime: int = 3600
    clients: dict[str, Client] = field(default_factory=dict)
    tenants: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)    # every access token the endpoints gave out (secrets)
    failures: list[int] = field(default_factory=list)  # the next token requests answer with these HTTP statuses

    def __post_init__(self):
        self.ca = TestCA()
        self.signing_key = new_key()
        self.port = 0
        self._http = None
        self._lock = threading.Lock()
        self.app = self._app()

    # --- running --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/"

    def start(self) -> TokenServer:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self._http = make_server("127.0.0.1", self.port, self.app, threaded=True,
                                 ssl_context=self.ca.server_context())
        self.port = self._http.server_port
        threading.Thread(target=self._http.serve_forever, name="token-server", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering (the port refuses connections); :meth:`start` again serves on the same port."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def public_key_pem(self) -> str:
        return self.signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def token_requests(self, client_id: str | None = None) -> list[Request]:
        return [r for r in self.requests if client_id is None or r.client_id == client_id]

    # --- registering ----------------------------------------------------------------------------

    def microsoft_app(self, tenant: str, mailbox: str, *, secret: str | None = None, certificate=None) -> str:
        """An app registration in ``tenant`` allowed to use ``mailbox``; a secret, or a certificate's
        public key (an ``x509.Certificate``). Returns its client id."""
        client_id = str(uuid.uuid4())
        self.tenants.add(tenant)
        self.clients[client_id] = Client(client_id, ENTRA, mailbox.lower(), tenant=tenant, secret=secret,
                                         public_key=certificate.public_key() if certificate is not None else None)
        return client_id

    def google_service_account(self, mailbox: str, project: str = "fjordlys-mail") -> dict:
        """A service account delegated for ``mailbox`` with the scope https://mail.google.com/; returns its
        key file as Google's console downloads it, ``token_uri`` pointing here."""
        key = new_key()
        email = f"invoice-mailing-{uuid.uuid4().hex[:6]}@{project}.iam.gserviceaccount.com"
        self.clients[email] = Client(email, GOOGLE, mailbox.lower(), public_key=key.public_key())
        return {"type": "service_account", "project_id": project, "private_key_id": uuid.uuid4().hex,
                "private_key": _pem(key), "client_email": email, "client_id": str(uuid.uuid4().int)[:21],
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": f"{self.url}/google/token"}

    def client(self, mailbox: str, secret: str) -> str:
        """A client of another provider (the client credentials grant at /oauth2/token)."""
        client_id = f"client-{uuid.uuid4().hex[:8]}"
        self.clients[client_id] = Client(client_id, OTHER, mailbox.lower(), secret=secret)
        return client_id

    def revoke(self, client_id: str) -> None:
        """The administrator deleted or let expire the client's credentials."""
        self.clients[client_id].revoked = True

    # --- tokens ---------------------------------------------------------------------------------

    def mint(self, subject: str, audience: str, *, lifetime: int | None = None, issuer: str | None = None,
             key: rsa.RSAPrivateKey | None = None, issued_at: float | None = None) -> str:
        """A signed access token as the endpoints issue it; the tests' forged, expired, wrong-issuer and
        wrong-audience tokens are made here, with another ``key``, ``issued_at`` or ``issuer``."""
        now = int(issued_at if issued_at is not None else time.time())
        claims = {"iss": issuer or self.issuer, "sub": subject.lower(), "aud": audience, "iat": now, "nbf": now,
                  "exp": now + (self.lifetime if lifetime is None else lifetime), "jti": uuid.uuid4().hex}
        signing = RSAKey.import_key(_pem(key or self.signing_key))
        return jwt.encode({"alg": "RS256", "typ": "JWT"}, claims, signing)

    def access_token(self, grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=False):
        """Authlib's token generator: the JWT for the client's mailbox, for the scope's resource."""
        scope = g.get("scope") or scope or ""
        audience = scope.removesuffix("/.default") if g.door == ENTRA else scope
        token = self.mint(client.mailbox, audience or "default")
        self.issued.append(token)
        return {"token_type": "Bearer", "expires_in": self.lifetime, "access_token": token}

    # --- the HTTP side --------------------------------------------------------------------------

    def _app(self) -> Flask:
        app = Flask("token-server")
        server = _Server(app, self)

        def token(door: str, tenant: str | None = None):
            g.door, g.tenant = door, tenant
            with self._lock:
                failure = self.failures.pop(0) if self.failures else None
            if failure is not None:
                response = app.response_class("Service Unavailable", status=failure, mimetype="text/plain",
                                              headers={"Retry-After": "1"})  # msal waits as long before asking again
            elif door == ENTRA and tenant not in self.tenants:
                response = jsonify(error="invalid_tenant", error_codes=[90002],
                                   error_description=f"AADSTS90002: Tenant '{tenant}' not found.")
                response.status_code = 400
            else:
                response = server.create_token_response()
            body = json.loads(response.get_data()) if response.mimetype == "application/json" else {}
            client_id = request.form.get("client_id") or _assertion_issuer(request.form.get("assertion"))
            if client_id is None and request.authorization:
                client_id = request.authorization.username
            self.requests.append(Request(door, client_id, response.status_code, body.get("error")))
            return response

        @app.get("/<tenant>/v2.0/.well-known/openid-configuration")
        def entra_discovery(tenant):
            if tenant not in self.tenants:
                response = jsonify(error="invalid_tenant", error_codes=[90002],
                                   error_description=f"AADSTS90002: Tenant '{tenant}' not found. Check to make sure "
                                                     "you have the correct tenant ID and are signing into the "
                                                     "correct cloud.")
                response.status_code = 400
                return response
            base = f"{self.url}/{tenant}"
            return jsonify(issuer=f"{base}/v2.0", token_endpoint=f"{base}/oauth2/v2.0/token",
                           authorization_endpoint=f"{base}/oauth2/v2.0/authorize",
                           device_authorization_endpoint=f"{base}/oauth2/v2.0/devicecode",
                           token_endpoint_auth_methods_supported=["client_secret_post", "private_key_jwt"])

        app.add_url_rule("/<tenant>/oauth2/v2.0/token", "entra_token", lambda tenant: token(ENTRA, tenant),
                         methods=["POST"])
        app.add_url_rule("/google/token", "google_token", lambda: token(GOOGLE), methods=["POST"])
        app.add_url_rule("/oauth2/token", "other_token", lambda: token(OTHER), methods=["POST"])
        return app


def _assertion_issuer(assertion: str | None) -> str | None:
    """The ``iss`` of a JWT bearer assertion, unverified: only to name the client in :attr:`TokenServer.requests`."""
    try:
        payload = (assertion or "").split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("iss")
    except (IndexError, ValueError, AttributeError):
        return None
