"""HTTP sender (`HttpSenderSetting`): one request per message.

2xx succeeds (the response becomes the activity's inbound message when `WaitForResponse`);
5xx, 408, 429 and network errors are transient; any other status is permanent. Every request
carries `X-Soupflow-Request-Id` (the message's RequestId, the same on every retry) so that
receivers can deduplicate. Reasons name the configured server, never expanded values (PHI).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from soupflow import tls
from soupflow.activities.base import Activity, Outcome
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model
from soupflow.workflow.types import HttpAuthentication, HttpMethod

REQUEST_ID_HEADER = "X-Soupflow-Request-Id"
_TRANSIENT_STATUSES = frozenset({408, 429})
_TOKENS: dict[tuple[str, str, str], tuple[str, float]] = {}
_TOKENS_LOCK = threading.Lock()
_TOKEN_MARGIN_SECONDS = 30


def run(setting: model.HttpSenderSetting, activity: Activity) -> Outcome:
    context = activity.context
    url = context.expand(setting.server)
    headers = {header.name: context.expand(header.value) for header in setting.headers}
    headers[REQUEST_ID_HEADER] = context.arrival.request_id
    try:
        body = activity.outbound.encode(setting.encoding)
    except LookupError:
        raise PermanentError(f"unknown Encoding {setting.encoding!r}") from None
    if setting.method != HttpMethod.GET:
        headers.setdefault("Content-Type", f"{setting.content_type}; charset={setting.encoding}")
    auth: httpx.Auth | None = None
    if setting.authentication_mode == HttpAuthentication.Basic:
        auth = httpx.BasicAuth(context.expand(setting.user_name), context.expand(setting.password))
    elif setting.authentication_mode == HttpAuthentication.OAuth2ClientCredentials:
        headers["Authorization"] = f"Bearer {_token(setting, activity)}"
    response = send(
        client_for(setting, activity),
        setting.server,
        setting.method.name,
        url,
        content=None if setting.method == HttpMethod.GET else body,
        headers=headers,
        auth=auth,
        timeout=setting.timeout_seconds,
    )
    return Outcome(response.text if setting.wait_for_response else None, described(response))


def client_for(setting: model.ClientTlsFields, activity: Activity) -> httpx.Client:
    """The shared client, or (with TLS fields set) one kept for those settings."""
    if not any(
        (
            setting.trusted_certificates_file.strip(),
            setting.client_certificate_file.strip(),
            setting.client_private_key_file.strip(),
        )
    ):
        return activity.http
    folder = activity.context.workflow.path.parent
    try:
        settings = tls.sender_tls(setting, "", folder)
        return activity.connections.http_client(settings)
    except tls.TlsError as exc:
        raise PermanentError(f"TLS settings: {exc}") from None


def described(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}"


def send(
    client: httpx.Client,
    server: str,
    method: str,
    url: str,
    conflict_reason: Callable[[httpx.Response], str | None] | None = None,
    **options: object,
) -> httpx.Response:
    """One request, its status classified; `server` (the setting, not the expanded URL) names it."""
    try:
        response = client.request(method, url, **options)  # type: ignore[arg-type]
    except httpx.TimeoutException:
        raise TransientError(f"no answer from {server!r} in time") from None
    except httpx.TransportError as exc:
        raise TransientError(f"cannot reach {server!r}: {type(exc).__name__}") from None
    except httpx.InvalidURL:
        raise PermanentError(f"{server!r} does not expand to a valid URL") from None
    status = response.status_code
    if 200 <= status < 300:
        return response
    reason = f"HTTP {status} {response.reason_phrase} from {server!r}"
    detail = conflict_reason(response) if conflict_reason and status == 409 else None
    if detail:
        reason = f"{reason}: {detail}"
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise TransientError(reason)
    raise PermanentError(reason)


def _token(setting: model.HttpSenderSetting, activity: Activity) -> str:
    """An OAuth2 client-credentials access token, reused until shortly before it expires."""
    context = activity.context
    token_url, client_id = context.expand(setting.token_url), context.expand(setting.user_name)
    key = (token_url, client_id, setting.scope)
    with _TOKENS_LOCK:
        cached = _TOKENS.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": context.expand(setting.password),
    }
    if setting.scope:
        form["scope"] = setting.scope
    response = send(
        client_for(setting, activity),
        setting.token_url,
        "POST",
        token_url,
        data=form,
        timeout=setting.timeout_seconds,
    )
    try:
        body = response.json()
        token = str(body["access_token"])
        lifetime = float(body.get("expires_in", 300))
    except (ValueError, KeyError, TypeError):
        raise PermanentError(
            f"the token endpoint {setting.token_url!r} gave no access_token"
        ) from None
    with _TOKENS_LOCK:
        _TOKENS[key] = (token, time.monotonic() + max(lifetime - _TOKEN_MARGIN_SECONDS, 0))
    return token
