"""What Microsoft 365 and Google Workspace answer about the account itself, and what their administrator must change.

An answer here refuses the account (its login, its way of logging in, the sender it may use), not one
recipient or one message: the first such answer fails every delivery of the account's batch at once,
without a session more, and its ``detail`` names the account and says what to change. Each is matched
by its enhanced status code (RFC 3463) and, where one code means several things, by the platform the
connection's host names. Every other answer is classified as before (``deliver.refusal_reason``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MICROSOFT, GOOGLE = "Microsoft 365", "Google Workspace"
BASIC_AUTH_DISABLED, SEND_AS_DENIED, AUTH_FAILED = "basic_auth_disabled", "send_as_denied", "auth_failed"
DOCS = "docs/mail-accounts.md"

_HOSTS = {"smtp.office365.com": MICROSOFT, "outlook.office365.com": MICROSOFT, "smtp-mail.outlook.com": MICROSOFT,
          "smtp.gmail.com": GOOGLE, "smtp-relay.gmail.com": GOOGLE, "imap.gmail.com": GOOGLE}


@dataclass(frozen=True)
class AccountRefusal:
    reason: str
    what_to_do: str


def platform_of(host: str | None) -> str | None:
    """The mail platform a connection's host belongs to, if it is one of those this module knows."""
    host = (host or "").strip().lower().rstrip(".")
    return _HOSTS.get(host) or (MICROSOFT if host.endswith(".mail.protection.outlook.com") else None)


def _enhanced(text: str) -> str | None:
    found = re.match(r"\s*([245]\.\d{1,3}\.\d{1,3})(?!\S)", text)
    return found.group(1) if found else None


def account_refusal(code: int, text: str, platform: str | None) -> AccountRefusal | None:
    """The account-level refusal an answer is, with the administrator's line; None for any other answer."""
    if code < 500:
        return None
    enhanced, words = _enhanced(text), text.lower()
    if enhanced == "5.7.30" or "basic authentication is not supported" in words:
        return AccountRefusal(BASIC_AUTH_DISABLED, "Microsoft 365 no longer takes a password for SMTP AUTH: give the "
                              "connection OAuth 2.0 (auth_type oauth2, tenant_id, client_id, and the app's client "
                              f"secret as its password; {DOCS})")
    if enhanced in ("5.2.252", "5.7.60") or "sendasdenied" in words or "permissions to send as" in words:
        return AccountRefusal(SEND_AS_DENIED, "the mailbox may not send as this From address or envelope sender: "
                              "send from the mailbox's own address (the email account's address), or grant it "
                              "Send As (Add-RecipientPermission); with the bounce mailbox set, give the connection "
                              'the extra "envelope_sender": "mailbox"')
    if enhanced == "5.7.57":  # Exchange Online answers it to MAIL FROM when the session did not log in
        return AccountRefusal(AUTH_FAILED, "Microsoft 365 takes mail only from a logged-in session: give the "
                              "connection its mailbox as login and OAuth 2.0 (auth_type oauth2; "
                              f"{DOCS})")
    if code not in (530, 534, 535):
        return None
    if enhanced == "5.7.139":
        return AccountRefusal(AUTH_FAILED, "Microsoft 365 refused the login: SMTP AUTH is disabled for the tenant or "
                              "the mailbox (Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled "
                              "$false), security defaults block it, or the password is wrong; OAuth 2.0 needs none")
    if enhanced == "5.7.3":
        return AccountRefusal(AUTH_FAILED, "Microsoft 365 refused the token: the app needs the Office 365 Exchange "
                              "Online permission SMTP.SendAsApp with admin consent, a service principal in Exchange "
                              "(New-ServicePrincipal) and the mailbox's permission (Add-MailboxPermission), and "
                              "the connection's login must be that mailbox")
    if enhanced == "5.7.9" or (platform == GOOGLE and code == 534):
        return AccountRefusal(AUTH_FAILED, "Google takes no account password here: give the connection a service "
                              "account with domain-wide delegation for https://mail.google.com/ (auth_type oauth2, "
                              f"the key file as its password; {DOCS}), or an app password")
    if platform == GOOGLE and enhanced == "5.7.8":
        return AccountRefusal(AUTH_FAILED, "Google did not accept the login or token (BadCredentials): check the "
                              "service account's domain-wide delegation for this mailbox and the scope "
                              "https://mail.google.com/, or the app password")
    return AccountRefusal(AUTH_FAILED, "the server refused the login: check the connection's login and password, or "
                          "its OAuth settings (the token must be for the login's mailbox)")
