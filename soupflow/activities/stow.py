"""STOW-RS sender (`Soupflow.Senders.StowRsSenderSetting`): DICOMweb store of the received object.

POSTs `multipart/related; type="application/dicom"` to `{BaseUrl}/studies` with the stored
object unmodified, streamed from disk (memory stays flat for any size). PS3.18 10.5: 200 is
stored; 202 means some instances failed, so the response's Failed SOP Sequence is read and an
instance listed there is a permanent failure with its reason; 409 is permanent; 5xx, 408, 429
and network errors are transient; other 4xx permanent. Secrets come from `${env:NAME}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from soupflow.activities.base import Activity, Outcome
from soupflow.activities.http import REQUEST_ID_HEADER, client_for, described, send
from soupflow.pipeline.errors import PermanentError
from soupflow.workflow import model
from soupflow.workflow.types import BearerAuthentication

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
_CHUNK = 1 << 20


def _body(path: Path, boundary: str) -> Iterator[bytes]:
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk
    yield f"\r\n--{boundary}--\r\n".encode("ascii")


def run(setting: model.StowRsSenderSetting, activity: Activity) -> Outcome:
    context = activity.context
    url = context.expand(setting.base_url).rstrip("/") + "/studies"
    boundary = uuid.uuid4().hex
    headers = {header.name: context.expand(header.value) for header in setting.headers}
    headers.update(
        {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            REQUEST_ID_HEADER: context.arrival.request_id,
        }
    )
    auth: httpx.Auth | None = None
    if setting.authentication_mode == BearerAuthentication.Basic:
        auth = httpx.BasicAuth(context.expand(setting.user_name), context.expand(setting.password))
    elif setting.authentication_mode == BearerAuthentication.Bearer:
        headers["Authorization"] = f"Bearer {context.expand(setting.bearer_token)}"
    response = send(
        client_for(setting, activity),
        setting.base_url,
        "POST",
        url,
        content=_body(context.object_path, boundary),
        headers=headers,
        auth=auth,
        timeout=setting.timeout_seconds,
        conflict_reason=lambda r: _failure(r, context.arrival.sop_instance_uid),
    )
    if response.status_code == 202:
        reason = _failure(response, context.arrival.sop_instance_uid)
        if reason is not None:
            raise PermanentError(f"{setting.base_url!r} did not store the instance (202): {reason}")
    return Outcome(str(response.text), described(response))


def _failure(response: httpx.Response, sop_instance_uid: str) -> str | None:
    """The failure reason the response gives for this instance (PS3.18 Table 10.5.3-1)."""
    try:
        document: Any = response.json()
    except (ValueError, json.JSONDecodeError):
        return "the response is not DICOM JSON" if response.status_code != 200 else None
    for item in (document or {}).get(FAILED_SOP_SEQUENCE, {}).get("Value", []):
        uid = (item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value") or [""])[0]
        if uid == sop_instance_uid:
            code = (item.get(FAILURE_REASON, {}).get("Value") or [0])[0]
            return f"Failure Reason 0x{int(code):04X}"
    return None
