"""Alerts for a person: one Discord-compatible webhook POST, whose URL is a secret and never shown.

A webhook URL carries its own credential (anyone holding it can post), so it comes only from the
environment and no message, log line or error here contains it. Sending never raises: the alert
reports a failure, and a second failure while reporting must not hide the first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

log = logging.getLogger(__name__)

WEBHOOK_ENV = "CRYPTOML_ALERT_WEBHOOK"
# Discord refuses a message longer than this; the end of a long failure is cut, its start kept.
MAX_CONTENT_CHARS = 2000
TIMEOUT_SECONDS = 10.0
_TRUNCATION_MARK = "\n[...]"


def alert_payload(message: str) -> bytes:
    """The JSON body Discord (and Discord-compatible receivers) expect: {"content": message}."""
    if len(message) > MAX_CONTENT_CHARS:
        message = message[: MAX_CONTENT_CHARS - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
    return json.dumps({"content": message}).encode()


def _failure_reason(error: Exception) -> str:
    """Why a POST failed, from parts that cannot contain the URL (a ValueError for a bad URL quotes it)."""
    if isinstance(error, HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, URLError):
        return f"{type(error.reason).__name__}: {error.reason}" if isinstance(error.reason, OSError) else "unreachable"
    return type(error).__name__


def send_alert(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """POST `message` to the webhook in $CRYPTOML_ALERT_WEBHOOK; True when it was accepted (HTTP 2xx)."""
    url = environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        log.warning("%s is not set: the alert was only logged", WEBHOOK_ENV)
        return False
    if not url.startswith(("https://", "http://")):
        log.error("%s is not an http(s) URL: the alert was only logged", WEBHOOK_ENV)
        return False
    request = Request(
        url,
        data=alert_payload(message),
        # Discord's CDN refuses urllib's default User-Agent.
        headers={"Content-Type": "application/json", "User-Agent": "cryptoml-alerts"},
        method="POST",
    )
    try:
        with urlopen(request, timeout=TIMEOUT_SECONDS):  # noqa: S310 (http(s) only, checked above)
            pass
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
        log.error("the alert could not be sent to the webhook in %s (%s)", WEBHOOK_ENV, _failure_reason(error))
        return False
    log.info("alert sent to the webhook in %s", WEBHOOK_ENV)
    return True
