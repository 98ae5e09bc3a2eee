"""Where alerts go: a Slack-compatible webhook and e-mail, configured only from the environment.

Standard library only (urllib, smtplib), so `so-pipeline alert-test` and the daemon's sensors
send the same way. Every channel is off unless its variable is set.
"""

import json
import logging
import os
import re
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import unquote, urlsplit

from so_pipeline.database_url import scrub

WEBHOOK_URL_VAR = "SO_ALERT_WEBHOOK_URL"
SMTP_URL_VAR = "SO_ALERT_SMTP_URL"
EMAIL_TO_VAR = "SO_ALERT_EMAIL_TO"
EMAIL_FROM_VAR = "SO_ALERT_EMAIL_FROM"

# Three attempts, 0.5 s then 1 s apart, each bounded by the timeout: a dead channel costs a
# sensor evaluation under 10 s, far below the daemon's limit, and the next alert is not late.
ATTEMPTS = 3
BACKOFF_SECONDS = (0.5, 1.0)
TIMEOUT_SECONDS = 2.5

_CREDENTIALS_IN_URL = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """`text` with the password of any `scheme://user:password@` URL in it replaced by ***."""
    return _CREDENTIALS_IN_URL.sub(r"\1***@", text)


class Channel(Protocol):
    """One destination; `send` raises on any failure, `deliver` retries it."""

    @property
    def name(self) -> str: ...

    @property
    def secrets(self) -> Sequence[str]:
        """Strings that must not appear in a log line about this channel."""
        ...

    def send(self, subject: str, text: str) -> None: ...


@dataclass(frozen=True)
class WebhookChannel:
    """An incoming webhook taking `{"text": ...}`: Slack, Mattermost, Teams workflows."""

    url: str

    @property
    def name(self) -> str:
        # The path of a Slack or Teams webhook URL is its secret: name the host only.
        return f"webhook {urlsplit(self.url).hostname}"

    @property
    def secrets(self) -> Sequence[str]:
        return [self.url, urlsplit(self.url).path] if urlsplit(self.url).path.strip("/") else []

    def send(self, subject: str, text: str) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"text": text}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        # urlopen raises HTTPError for any answer outside 2xx/3xx.
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS):
            pass


@dataclass(frozen=True)
class EmailChannel:
    """Mail through an SMTP relay; STARTTLS whenever the server offers it (smtps: TLS at once)."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None
    sender: str
    recipients: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"e-mail via {self.host}:{self.port} to {', '.join(self.recipients)}"

    @property
    def secrets(self) -> Sequence[str]:
        return [self.password] if self.password else []

    def send(self, subject: str, text: str) -> None:
        message = EmailMessage()
        message["Subject"] = subject
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message.set_content(text)
        tls = ssl.create_default_context()
        smtp: smtplib.SMTP = (
            smtplib.SMTP_SSL(self.host, self.port, timeout=TIMEOUT_SECONDS, context=tls)
            if self.implicit_tls
            else smtplib.SMTP(self.host, self.port, timeout=TIMEOUT_SECONDS)
        )
        with smtp:
            smtp.ehlo()
            if not self.implicit_tls and smtp.has_extn("starttls"):
                smtp.starttls(context=tls)
                smtp.ehlo()
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)


@dataclass(frozen=True)
class ChannelSettings:
    """The configured channels, and what is wrong with the variables that could not be used."""

    channels: tuple[Channel, ...]
    problems: tuple[str, ...]


def channels_from_env(env: Mapping[str, str] | None = None) -> ChannelSettings:
    """Read the SO_ALERT_* variables now (not at import), so a changed environment counts."""
    env = os.environ if env is None else env
    channels: list[Channel] = []
    problems: list[str] = []
    webhook = env.get(WEBHOOK_URL_VAR, "").strip()
    if webhook:
        if urlsplit(webhook).scheme in ("http", "https") and urlsplit(webhook).hostname:
            channels.append(WebhookChannel(webhook))
        else:
            problems.append(f"{WEBHOOK_URL_VAR} is not an http(s):// URL; the webhook is off")
    smtp_url = env.get(SMTP_URL_VAR, "").strip()
    if smtp_url:
        email, problem = _email_channel(smtp_url, env)
        if email:
            channels.append(email)
        else:
            problems.append(f"{problem}; e-mail is off")
    return ChannelSettings(tuple(channels), tuple(problems))


def _email_channel(smtp_url: str, env: Mapping[str, str]) -> tuple[EmailChannel | None, str]:
    recipients = tuple(a.strip() for a in env.get(EMAIL_TO_VAR, "").split(",") if a.strip())
    if not recipients:
        return None, f"{SMTP_URL_VAR} is set but {EMAIL_TO_VAR} names no recipient"
    try:
        parts = urlsplit(smtp_url)
        port = parts.port
    except ValueError:  # a port that is not a number
        parts, port = None, None
    if parts is None or parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        # The URL itself is not repeated: it may hold the relay's password.
        return None, f"{SMTP_URL_VAR} is not a URL like smtp://user:password@host:587"
    implicit_tls = parts.scheme == "smtps"
    username = unquote(parts.username) if parts.username else None
    sender = env.get(EMAIL_FROM_VAR, "").strip() or f"so-pipeline@{socket.getfqdn()}"
    return EmailChannel(
        host=parts.hostname,
        port=port or (465 if implicit_tls else 25),
        implicit_tls=implicit_tls,
        username=username,
        password=unquote(parts.password) if parts.password else None,
        sender=sender,
        recipients=recipients,
    ), ""


@dataclass(frozen=True)
class Delivery:
    """What happened when one message went to one channel."""

    channel: str
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.ok:
            return f"{self.channel}: sent"
        return f"{self.channel}: FAILED after {self.attempts} attempts: {self.error}"


def deliver(
    channel: Channel,
    subject: str,
    text: str,
    log: logging.Logger,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Send with bounded retries; never raise: a dead channel must not stop the sensor."""
    error = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            channel.send(subject, text)
            return Delivery(channel.name, attempt)
        except Exception as failure:  # any failure of a channel is logged, never raised
            error = _safe_text(f"{type(failure).__name__}: {failure}", channel.secrets)
            log.warning(
                "Alert to %s failed (attempt %d of %d): %s", channel.name, attempt, ATTEMPTS, error
            )
            if attempt < ATTEMPTS:
                sleep(BACKOFF_SECONDS[attempt - 1])
    return Delivery(channel.name, ATTEMPTS, error)


def _safe_text(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = scrub(text, secret)
    return redact_credentials(text)
