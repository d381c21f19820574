"""Open an SMTP session as an Airflow SMTP connection says: the server, TLS, and the login (a password, or OAuth 2.0).

The SMTP provider's hook reads the connection (host, port, timeout, SSL or STARTTLS, login, ``auth_type``)
and its meaning is kept; the session itself is opened here, not by the hook's ``get_conn`` (which retries
on its own and keeps its client private) nor its ``send_email_smtp`` (which retries a send after the
server may have taken it). With ``auth_type: oauth2`` the login is SASL XOAUTH2, or OAUTHBEARER where
the server offers only that, with a token of the connection's source (``oauth.py``); a password login
is exactly what it was. Every refusal of the login is the account's (``SmtpAccountError``), with the
administrator's line for the platforms ``platform_answers`` knows.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, field

from include.invoice_mailing.oauth import (
    OAuthConfigError,
    Token,
    TokenRefused,
    TokenSource,
    TokenUnavailable,
    oauthbearer,
    token_source,
    xoauth2,
)
from include.invoice_mailing.platform_answers import GOOGLE, MICROSOFT, account_refusal, platform_of
from include.invoice_mailing.render import one_line

VERP, MAILBOX = "verp", "mailbox"
OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


class SmtpConfigError(Exception):
    """The mailing names an SMTP connection that Airflow does not have, or one whose settings are wrong:
    fix the setting, then it sends."""


class SmtpAccountError(Exception):
    """The relay refused the account itself (its login, TLS, its sender address), or the identity provider
    refused its credentials: fix the account, then it sends. Refuses every delivery of the account."""

    def __init__(self, reason: str, answer: str):
        super().__init__(answer)
        self.reason, self.answer = reason, answer


class TransientSmtpError(Exception):
    """The server or the network said 'not now' (4xx, timeout, dropped connection): try again later."""

    after_data = False         # the server may have taken the message: never retried blindly
    retry_now = True           # False: ``send`` does not retry it (the task's next try does)
    token_unavailable = False  # the token endpoint, not the relay: the batch's other messages wait too


def code_text(code: int, text: bytes | str) -> str:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {one_line(text, 300)}"


@dataclass
class SmtpAccount:
    """An SMTP connection's settings, read once per batch."""

    conn_id: str
    host: str
    port: int
    timeout: float
    use_ssl: bool
    starttls: bool
    tls: ssl.SSLContext | None
    login: str | None
    password: str | None = field(repr=False)
    extra: dict = field(repr=False)
    tokens: TokenSource | None = None   # auth_type oauth2
    envelope_sender: str = VERP         # with the bounce mailbox set: VERP, or the mailbox's own address

    @property
    def platform(self) -> str | None:
        return platform_of(self.host)

    @classmethod
    def from_connection(cls, conn_id: str) -> SmtpAccount:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        hook = SmtpHook(smtp_conn_id=conn_id)
        try:
            hook.smtp_connection = hook.get_connection(conn_id)
        except AirflowNotFoundException as exc:
            raise SmtpConfigError(f"the SMTP connection {conn_id!r} does not exist in Airflow") from exc
        extra = hook.smtp_connection.extra_dejson
        tokens = None
        if hook.auth_type == "oauth2":
            try:
                tokens = token_source(conn_id, login=hook.smtp_user or None, password=hook.smtp_password or None,
                                      extra=extra)
            except OAuthConfigError as exc:
                raise SmtpConfigError(str(exc)) from None
        return cls(conn_id=conn_id, host=hook.host, port=hook.port or 0, timeout=hook.timeout,
                   use_ssl=hook.use_ssl, starttls=bool(hook.smtp_starttls and not hook.use_ssl),
                   tls=_tls_context(conn_id, hook.ssl_context), login=hook.smtp_user or None,
                   password=hook.smtp_password or None, extra=extra, tokens=tokens,
                   envelope_sender=_envelope_sender(conn_id, extra, platform_of(hook.host)))

    def token(self) -> Token | None:
        """The login's token, or None for a password login. TokenRefused is the account's; TokenUnavailable is
        transient: the deliveries stay pending."""
        if self.tokens is None:
            return None
        try:
            token = self.tokens.token()
        except TokenRefused as exc:
            raise SmtpAccountError("token_refused", str(exc)) from None
        except TokenUnavailable as exc:
            error = TransientSmtpError(str(exc))
            error.token_unavailable = True
            raise error from None
        mask_token(token.value)
        return token

    def open(self, token: Token | None) -> smtplib.SMTP:
        """A session to the relay, encrypted as the connection says and logged in."""
        if self.use_ssl:
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self.tls)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            self._secure(client)
            self._log_in(client, token)
        except BaseException:
            client.close()
            raise
        return client

    def _secure(self, client: smtplib.SMTP) -> None:
        client.ehlo_or_helo_if_needed()
        if not self.starttls:  # an SSL connection is encrypted already
            return
        if not client.has_extn("starttls"):
            raise SmtpAccountError("tls_unavailable", "the relay does not offer STARTTLS and the SMTP connection "
                                   "requires TLS (its extra has no disable_tls)")
        try:
            client.starttls(context=self.tls)
        except smtplib.SMTPResponseException as exc:
            raise self._refused(exc, "tls_unavailable", "STARTTLS refused") from exc
        client.ehlo()

    def _log_in(self, client: smtplib.SMTP, token: Token | None) -> None:
        challenges: list[str] = []
        try:
            if token is not None:
                mechanism, initial = self._oauth(client, token)

                def respond(challenge=None):  # a challenge is the server's error (JSON): answer empty, then 535
                    if challenge:
                        challenges.append(one_line(challenge.decode("utf-8", "replace"), 200))
                        return ""
                    return initial

                client.auth(mechanism, respond)
            elif self.login and self.password:
                client.login(self.login, self.password)
        except smtplib.SMTPServerDisconnected:
            raise
        except smtplib.SMTPException as exc:  # refused, no AUTH offered, or no mechanism in common
            error = self._refused(exc, "auth_failed", "login refused")
            if challenges and isinstance(error, SmtpAccountError):
                error = SmtpAccountError(error.reason, f"{error.answer} (the server's error: {challenges[0]})")
            raise error from exc

    def _oauth(self, client: smtplib.SMTP, token: Token) -> tuple[str, str]:
        offered = (client.esmtp_features.get("auth") or "").upper().split()
        wanted = str(self.extra.get("sasl_mechanism") or "").upper()
        if wanted and wanted not in OAUTH_MECHANISMS:
            raise SmtpConfigError(f"the SMTP connection {self.conn_id!r} has sasl_mechanism {wanted!r}: it may be "
                                  "XOAUTH2 or OAUTHBEARER")
        mechanism = wanted or next((m for m in OAUTH_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise SmtpAccountError("auth_failed", f"the relay offers AUTH {' '.join(offered) or 'nothing'}, neither "
                                   "XOAUTH2 nor OAUTHBEARER, which the connection's OAuth 2.0 login needs")
        return mechanism, sasl_response(mechanism, self.tokens.settings.user, token.value, self.host, self.port)

    def _refused(self, exc: smtplib.SMTPException, reason: str, what: str) -> Exception:
        """A failed STARTTLS or AUTH: a 4xx is transient; anything else is the account's to fix, with the
        platform's line where it has one."""
        code = getattr(exc, "smtp_code", 0)
        answer = code_text(code, exc.smtp_error) if code else one_line(str(exc), 300)
        if 400 <= code < 500:
            return TransientSmtpError(answer)
        known = account_refusal(code, answer.partition(" ")[2], self.platform) if reason == "auth_failed" and code \
            else None
        if known is not None:
            return SmtpAccountError(known.reason, f"{what}: {answer}: {known.what_to_do}")
        return SmtpAccountError(reason, f"{what}: {answer}")


def _tls_context(conn_id: str, setting: str | None) -> ssl.SSLContext | None:
    """The connection's ``ssl_context`` extra, as the SMTP provider reads it."""
    if setting not in (None, "default", "none"):
        raise SmtpConfigError(f"the SMTP connection {conn_id!r} has ssl_context {setting!r}; it may be 'default' "
                              "or 'none'")
    return None if setting == "none" else ssl.create_default_context()


def _envelope_sender(conn_id: str, extra: dict, platform: str | None) -> str:
    """VERP, or the mailbox's own address where the platform takes no other envelope sender (Microsoft 365
    refuses or rewrites one, Gmail rewrites it): the extra ``envelope_sender``, else the platform's default."""
    value = extra.get("envelope_sender") or (MAILBOX if platform in (MICROSOFT, GOOGLE) else VERP)
    if value not in (VERP, MAILBOX):
        raise SmtpConfigError(f"the SMTP connection {conn_id!r} has envelope_sender {value!r}; it may be "
                              f"{VERP!r} or {MAILBOX!r}")
    return value


def sasl_response(mechanism: str, user: str, token: str, host: str, port: int) -> str:
    """The initial response of an OAuth 2.0 SASL mechanism, for SMTP AUTH and IMAP AUTHENTICATE alike."""
    return xoauth2(user, token) if mechanism == "XOAUTH2" else oauthbearer(user, token, host, port)


def mask_token(secret: str) -> None:
    """Airflow's log masker hides the token wherever a log line might carry it (none should)."""
    from airflow.sdk.log import mask_secret

    mask_secret(secret)

