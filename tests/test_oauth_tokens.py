"""A mail account's OAuth 2.0 token, from the library made for it, against a real authorization server.

msal (Microsoft 365: a client secret, or a certificate), google-auth (Google Workspace: a service account
acting for the mailbox) and Authlib (any other provider's client credentials grant) ask the server of
dev/token_server.py over HTTPS through their own configuration only: an authority on it, the key file's
``token_uri``, a token URL. What each refusal says, that the secret is never in it, and what is a
configuration error before anything is asked.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from dev.token_server import GOOGLE_SCOPE, MICROSOFT_RESOURCE, new_key
from include.invoice_mailing import oauth
from include.invoice_mailing.oauth import OAuthConfigError, TokenRefused, TokenUnavailable, token_source

TENANT = "fjordlys-tenant"
MAILBOX = "faktura@fjordlys.example"
SECRET = "Zq8~the-client-secret-value"


@pytest.fixture(autouse=True)
def fresh_sources():
    oauth.forget_sources()
    yield
    oauth.forget_sources()


def claims(token: str) -> dict:
    import base64

    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def microsoft(identity, conn_id="smtp_o365", *, password=SECRET, tenant=TENANT, **extra):
    return token_source(conn_id, login=MAILBOX, password=password,
                        extra={"tenant_id": tenant, "authority": identity.url, **extra})


def certificate_pair(common_name: str = "invoice-mailing"):
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert, cert.public_bytes(serialization.Encoding.PEM).decode(), pem_key


# --- Microsoft 365: msal's confidential client ------------------------------------------------------------

def test_msal_gets_a_token_for_the_mailbox_with_the_client_secret_and_reuses_it(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    source = microsoft(identity, client_id=client_id)

    first, second = source.token(), source.token()

    assert first.value == second.value
    assert [r.status for r in identity.token_requests(client_id)] == [200]  # msal's own cache answered the second
    assert claims(first.value)["aud"] == MICROSOFT_RESOURCE and claims(first.value)["sub"] == MAILBOX
    assert first.issued_at < first.renew_at() < first.expires_at


def test_a_short_lived_token_is_fetched_again_once_it_is_due(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    identity.lifetime = 2
    try:
        source = microsoft(identity, client_id=client_id)
        first = source.token()
        time.sleep(2.1)
        second = source.token()
    finally:
        identity.lifetime = 3600
    assert first.value != second.value and second.expires_at > first.expires_at
    assert len(identity.token_requests(client_id)) == 2


@pytest.mark.parametrize("named_by", ["certificate", "certificate_thumbprint"])
def test_msal_signs_with_the_certificate_the_app_registration_holds(identity, named_by):
    cert, cert_pem, key_pem = certificate_pair()
    client_id = identity.microsoft_app(TENANT, MAILBOX, certificate=cert)
    named = cert_pem if named_by == "certificate" else cert.fingerprint(hashes.SHA1()).hex().upper()

    token = microsoft(identity, password=None, client_id=client_id, private_key=key_pem, **{named_by: named}).token()

    assert claims(token.value)["sub"] == MAILBOX
    assert [r.status for r in identity.token_requests(client_id)] == [200]


def test_a_certificate_that_is_not_its_keys_pair_is_refused_before_anything_is_asked(identity):
    cert, cert_pem, _ = certificate_pair()
    _, _, other_key = certificate_pair("another")
    client_id = identity.microsoft_app(TENANT, MAILBOX, certificate=cert)

    with pytest.raises(OAuthConfigError, match="certificate that does not match its private_key"):
        microsoft(identity, password=None, client_id=client_id, certificate=cert_pem, private_key=other_key)
    assert identity.token_requests(client_id) == []


def test_a_key_the_app_registration_does_not_hold_is_refused_by_entra_id(identity):
    cert, _, _ = certificate_pair()
    other, _, other_key = certificate_pair("another")
    client_id = identity.microsoft_app(TENANT, MAILBOX, certificate=cert)
    source = microsoft(identity, password=None, client_id=client_id, private_key=other_key,
                       certificate_thumbprint=other.fingerprint(hashes.SHA1()).hex())

    with pytest.raises(TokenRefused, match="AADSTS700027") as refused:
        source.token()
    assert "not the one uploaded to the app registration" in str(refused.value)
    assert "BEGIN PRIVATE KEY" not in str(refused.value)


def test_a_wrong_secret_is_refused_with_entras_words_and_never_the_secret(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    source = microsoft(identity, password="Zq8~an-old-secret-value", client_id=client_id)

    with pytest.raises(TokenRefused) as refused:
        source.token()

    text = str(refused.value)
    assert text.startswith("Microsoft Entra ID refused the token request of connection 'smtp_o365': invalid_client: "
                           "AADSTS7000215: Invalid client secret provided.")
    assert "the client secret's value (not its ID)" in text and "\n" not in text
    assert "an-old-secret-value" not in text and SECRET not in text and "an-old-secret-value" not in repr(source)


def test_a_revoked_client_is_refused_and_says_so(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    identity.revoke(client_id)

    with pytest.raises(TokenRefused, match="AADSTS7000222: The provided client secret keys for app .* are expired"):
        microsoft(identity, client_id=client_id).token()


def test_a_tenant_that_does_not_exist_is_refused_with_entras_words(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)

    with pytest.raises(TokenRefused, match=r"invalid_tenant: AADSTS90002: Tenant 'fjordlys-typo' not found.*"
                                           r"check the connection's tenant_id"):
        microsoft(identity, client_id=client_id, tenant="fjordlys-typo").token()


def test_an_app_of_another_tenant_is_not_found(identity):
    client_id = identity.microsoft_app("another-tenant", MAILBOX, secret=SECRET)
    identity.tenants.add(TENANT)

    with pytest.raises(TokenRefused, match="AADSTS700016: Application with identifier"):
        microsoft(identity, client_id=client_id).token()


def test_a_scope_without_default_is_refused_by_entra_id(identity):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)

    with pytest.raises(TokenRefused, match="AADSTS1002012.*must end in /.default"):
        microsoft(identity, client_id=client_id, scope="https://outlook.office365.com/SMTP.Send").token()


@pytest.mark.parametrize("answer", ["down", 503])
def test_the_token_endpoint_down_or_failing_is_transient(identity, answer):
    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    source = microsoft(identity, client_id=client_id)
    if answer == "down":
        identity.stop()
    else:
        identity.failures[:] = [answer]
    try:
        with pytest.raises(TokenUnavailable, match="Microsoft Entra ID did not answer the token request of "
                                                   "connection 'smtp_o365'.*the deliveries stay pending"):
            source.token()
    finally:
        identity.failures.clear()
        if answer == "down":
            identity.start()
    if answer == "down":  # msal throttles a 5xx answer for a few seconds: a connection refused it does not
        assert source.token().value


# --- Google Workspace: a service account with domain-wide delegation ----------------------------------------

def google(identity, key, conn_id="smtp_gmail", login=MAILBOX, **extra):
    return token_source(conn_id, login=login, password=json.dumps(key), extra=extra)


def test_google_auth_gets_a_token_for_the_mailbox_the_service_account_acts_for(identity):
    key = identity.google_service_account(MAILBOX)

    source = google(identity, key)
    token = source.token()

    assert claims(token.value)["sub"] == MAILBOX and claims(token.value)["aud"] == GOOGLE_SCOPE
    assert source.token().value == token.value  # google-auth's credentials are valid until their expiry
    assert [r.status for r in identity.token_requests(key["client_email"])] == [200]


def test_a_mailbox_the_service_account_is_not_delegated_for_is_refused_with_googles_words(identity):
    key = identity.google_service_account(MAILBOX)

    with pytest.raises(TokenRefused, match="Google refused the token request of connection 'smtp_gmail': "
                                           "unauthorized_client: Client is unauthorized"):
        google(identity, key, login="ar@fjordlys.example").token()


def test_a_deleted_service_account_key_is_invalid_grant(identity):
    key = identity.google_service_account(MAILBOX)
    identity.revoke(key["client_email"])

    with pytest.raises(TokenRefused, match="invalid_grant: Invalid JWT Signature"):
        google(identity, key).token()


def test_the_key_file_may_be_named_by_its_path_on_the_workers(identity, tmp_path):
    key = identity.google_service_account(MAILBOX)
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))

    token = token_source("smtp_gmail", login=MAILBOX, password=None, extra={"key_path": str(path)}).token()

    assert claims(token.value)["sub"] == MAILBOX


@pytest.mark.parametrize("password, extra, said", [
    ("{not json", {}, "the service account key in the password is not JSON"),
    (None, {"keyfile_dict": '{"type": "authorized_user"}'}, "is not a service account key"),
    (None, {"key_path": "/nonexistent/key.json"}, "names key_path '/nonexistent/key.json', which cannot be read"),
    (None, {"oauth_provider": "google"}, "the service account key in the password is not JSON"),
])
def test_a_service_account_key_that_is_not_one_is_a_clear_configuration_error(password, extra, said):
    with pytest.raises(OAuthConfigError, match=said) as refused:
        token_source("smtp_gmail", login=MAILBOX, password=password, extra=extra)
    assert "smtp_gmail" in str(refused.value) and "\n" not in str(refused.value)


# --- Any other provider: the client credentials grant ---------------------------------------------------------

@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_another_providers_client_credentials_grant(identity, method):
    client_id = identity.client(MAILBOX, SECRET)
    source = token_source("smtp_other", login=MAILBOX, password=SECRET,
                          extra={"token_url": f"{identity.url}/oauth2/token", "client_id": client_id,
                                 "scope": "https://mail.example/", "token_auth_method": method})

    first, second = source.token(), source.token()

    assert first.value == second.value and claims(first.value)["aud"] == "https://mail.example/"
    assert len(identity.token_requests(client_id)) == 1


def test_another_providers_refusal_names_its_token_endpoint(identity):
    client_id = identity.client(MAILBOX, SECRET)

    with pytest.raises(TokenRefused, match=rf"the token endpoint {identity.url}/oauth2/token refused the token "
                                           "request of connection 'smtp_other': invalid_client"):
        token_source("smtp_other", login=MAILBOX, password="wrong",
                     extra={"token_url": f"{identity.url}/oauth2/token", "client_id": client_id}).token()


# --- What a connection must say -----------------------------------------------------------------------------

@pytest.mark.parametrize("login, password, extra, said", [
    (MAILBOX, None, {}, "has auth_type oauth2 but neither an access_token nor client credentials"),
    (MAILBOX, None, {"tenant_id": TENANT, "client_id": "x"}, "no the app's client secret as its password"),
    (MAILBOX, SECRET, {"client_id": "x"}, "no a tenant_id in its extra"),
    (MAILBOX, SECRET, {"tenant_id": "common", "client_id": "x"}, "has tenant_id 'common': an app that signs in"),
    (None, SECRET, {"tenant_id": TENANT, "client_id": "x"}, "no a login"),
    (MAILBOX, None, {"tenant_id": TENANT, "client_id": "x", "certificate_thumbprint": "ab"},
     "no a private_key"),
    (MAILBOX, None, {"tenant_id": TENANT, "client_id": "x", "private_key": "-----BEGIN PRIVATE KEY-----\nnope"},
     "has a private_key that is not a usable PEM private key"),
    (MAILBOX, SECRET, {"oauth_provider": "okta"}, "has oauth_provider 'okta'"),
    (MAILBOX, SECRET, {"token_url": "http://idp.example/token", "client_id": "x"}, "the token endpoint's https://"),
])
def test_settings_that_cannot_make_a_token_say_what_is_missing(login, password, extra, said):
    with pytest.raises(OAuthConfigError) as refused:
        token_source("smtp_o365", login=login, password=password, extra=extra)
    assert said in str(refused.value) and "smtp_o365" in str(refused.value)
    assert SECRET not in str(refused.value) and "nope" not in str(refused.value)


def test_a_static_access_token_is_used_as_it_is():
    token = token_source("smtp_trial", login=MAILBOX, password=None, extra={"access_token": "eyJ.trial.token"}).token()
    assert token.value == "eyJ.trial.token" and token.renew_at() == float("inf")


def test_a_changed_connection_gets_a_new_source(identity):
    first_app = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    second_app = identity.microsoft_app(TENANT, MAILBOX, secret="Zq8~the-second-secret")
    before = microsoft(identity, client_id=first_app)

    after = microsoft(identity, client_id=second_app, password="Zq8~the-second-secret")

    assert after is not before and after.token().value
    assert microsoft(identity, client_id=second_app, password="Zq8~the-second-secret") is after
