"""The state of one message's run: its messages, variables and loops. Upstream: pipeline.run.

Implements template expansion's Resolver and reads and writes values at paths in the
messages of the workflow's activities (the received DICOM message is the receiver's inbound
message, read as JSON).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from soupflow.message.convert import render, transport_details
from soupflow.pipeline import hl7
from soupflow.pipeline.errors import PermanentError
from soupflow.pipeline.patterns import format_datetime, format_value
from soupflow.store.queue import Arrival
from soupflow.workflow import model, paths, template
from soupflow.workflow.load import LoadedWorkflow
from soupflow.workflow.types import Direction, MessageType, PathType, normalize_reference

_DEFAULT_DATE_FORMAT = "yyyyMMddHHmmss"
_CONSTANTS = {
    "cr": "\r",
    "lf": "\n",
    "mllpstart": "\x0b",
    "mllpend": "\x1c\r",
    "workflowerror": "",
    "workflowerrormessage": "",
}


@dataclass
class Loop:
    """An active ForEach: `[1]` on its node means item `index` (1-based)."""

    family: str
    steps: tuple[paths.JsonStep, ...] = ()
    segment: str = ""
    index: int = 1


class Messages(dict[str, str]):
    """Activity messages by setting id. One can be deferred (`defer`): it is made when first
    read, so a message nobody reads (a DICOM sender's) costs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Callable[[], str]] = {}

    def defer(self, key: str, make: Callable[[], str]) -> None:
        super().pop(key, None)
        self._pending[key] = make

    def _resolve(self, key: str) -> None:
        make = self._pending.pop(key, None)
        if make is not None:
            super().__setitem__(key, make())

    def __getitem__(self, key: str) -> str:
        self._resolve(key)
        return super().__getitem__(key)

    def get(self, key: str, default: str = "") -> str:  # type: ignore[override]
        self._resolve(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._pending or super().__contains__(key)

    def __setitem__(self, key: str, value: str) -> None:
        self._pending.pop(key, None)
        super().__setitem__(key, value)


class RunContext:
    """One message's run. The DICOM message is made on first use (`message`): a workflow
    that only forwards the received object never converts it."""

    def __init__(
        self,
        workflow: LoadedWorkflow,
        message: dict[str, Any] | Callable[[], dict[str, Any]],
        arrival: Arrival,
        object_path: Path,
        data_folder: Path,
        now: datetime | None = None,
    ) -> None:
        receiver = workflow.receiver
        if receiver is None:
            raise PermanentError("the workflow has no receiver")
        self.workflow = workflow
        self.receiver_id = normalize_reference(receiver.id) or ""
        self._message = message if isinstance(message, dict) else None
        self._make_message = message if callable(message) else None
        self.arrival = arrival
        self.object_path = object_path
        self.data_folder = data_folder
        self.now = now or datetime.now(UTC)
        self.variables: dict[str, str] = {}
        self.outbound = Messages()
        self.inbound = Messages()
        self.loops: list[Loop] = []
        self._message_text: str | None = None

    # ------------------------------------------------------------------------ resolver
    def variable(self, name: str, spec: str) -> str:
        key = name.lower()
        if key in self.variables:
            return format_value(self.variables[key], spec)
        if key == "currentdatetime":
            return format_datetime(self.now.astimezone(), spec or _DEFAULT_DATE_FORMAT)
        if key == "receiveddate":
            received = datetime.fromtimestamp(self.arrival.received_at, UTC).astimezone()
            return format_datetime(received, spec or _DEFAULT_DATE_FORMAT)
        if key == "uuid":
            return str(uuid.uuid4())
        if key == "foreachiterator":
            return str(self.loops[-1].index) if self.loops else ""
        facts = {
            "workflowinstanceid": self.arrival.request_id,
            "requestid": self.arrival.request_id,
            "callingaet": self.arrival.origin.calling_aet,
            "calledaet": self.arrival.origin.called_aet,
            "peeraddress": self.arrival.origin.peer_address,
            "sopinstanceuid": self.arrival.sop_instance_uid,
            "clientcertsha256": self.arrival.origin.client_cert_sha256,
            "clientcertsubject": self.arrival.origin.client_cert_subject,
        }
        if key not in facts and self.arrival.origin.details:
            facts |= self._transport_variables()
        value = facts.get(key, _CONSTANTS.get(key, ""))
        return format_value(value, spec)

    def _transport_variables(self) -> dict[str, str]:
        """STOW-RS: `${StowStudyInstanceUID}` and the receiver's `HeaderParameters` (header
        -> variable), from what the request carried."""
        details = transport_details(self.arrival.origin)
        found = {"stowstudyinstanceuid": str(details.get("StowStudyInstanceUID", ""))}
        receiver = self.workflow.receiver
        headers = {name.lower(): value for name, value in details.get("Headers", {}).items()}
        if isinstance(receiver, model.StowRsReceiverSetting):
            for header, variable in receiver.header_parameters.items():
                found[variable.strip().lower()] = str(headers.get(header.lower(), ""))
        return found

    def activity_message(self, setting_id: str, direction: str) -> str:
        return self._text(
            setting_id, Direction.Inbound if direction == "inbound" else Direction.Outbound
        )

    def environment(self, name: str) -> str:
        return os.environ.get(name, "")

    def expand(self, text: str) -> str:
        try:
            return template.expand(text, self)
        except template.TemplateError as exc:
            raise PermanentError(
                f"template does not parse at character {exc.offset + 1}: {exc.message}"
            ) from None

    # ------------------------------------------------------------------------- messages
    @property
    def message(self) -> dict[str, Any]:
        """The received object's DICOM message (made now if nothing needed it yet)."""
        if self._message is None:
            assert self._make_message is not None
            self._message = self._make_message()
        return self._message

    @property
    def message_converted(self) -> bool:
        return self._message is not None

    @property
    def message_text(self) -> str:
        if self._message_text is None:
            self._message_text = render(self.message)
        return self._message_text

    @property
    def valid(self) -> bool:
        return "ParseError" not in self.message.get("Association", {})

    def _text(self, setting_id: str, direction: Direction) -> str:
        if setting_id == self.receiver_id:
            return self.message_text if direction == Direction.Inbound else ""
        store = self.inbound if direction == Direction.Inbound else self.outbound
        return store.get(setting_id, "")

    def message_type(self, setting_id: str) -> MessageType | None:
        entry = self.workflow.setting(setting_id)
        setting = entry.setting if entry else None
        return setting.message_type if isinstance(setting, model.SenderSetting) else None

    def source(self, setting: str | None) -> str:
        return normalize_reference(setting) or self.receiver_id

    def _family(self, path_type: PathType | None, direction: Direction, setting_id: str) -> str:
        message_type = None if setting_id == self.receiver_id else self.message_type(setting_id)
        return paths.family(path_type, direction, message_type)

    def read(
        self, path: str, path_type: PathType | None, direction: Direction, setting: str | None
    ) -> str:
        """The text at `path` of the message that `setting`/`direction` name ("" when absent)."""
        setting_id = self.source(setting)
        family = self._family(path_type, direction, setting_id)
        if family == paths.TEXT:
            return self.expand(path)
        if family == paths.JSON:
            return _as_text(self._json_value(setting_id, direction, path, whole_list=False))
        if family == paths.HL7:
            return hl7.read(self._text(setting_id, direction), self._hl7_path(path))
        raise PermanentError(f"{family.upper()} paths are not supported yet: {path!r}")

    def items(
        self, path: str, path_type: PathType | None, direction: Direction, setting: str | None
    ) -> tuple[Loop, int]:
        """What a ForEach over `path` loops on: its loop and how many items it has."""
        setting_id = self.source(setting)
        family = self._family(path_type, direction, setting_id)
        if family == paths.JSON:
            parsed = self._json_path(path)
            value = self._json_value(setting_id, direction, path, whole_list=True)
            count = len(value) if isinstance(value, list) else (0 if value in (None, "") else 1)
            steps = parsed.steps if isinstance(parsed, paths.SlashPath) else ()
            return Loop(paths.JSON, steps=steps), count
        if family == paths.HL7:
            segment = self._hl7_path(path).segment
            count = sum(
                1 for line in hl7.segments(self._text(setting_id, direction)) if line[:3] == segment
            )
            return Loop(paths.HL7, segment=segment), count
        raise PermanentError(f"cannot loop over {path!r}: only JSON and HL7 nodes")

    def write(
        self,
        setting: str | None,
        direction: Direction,
        path: str,
        path_type: PathType | None,
        value: str,
    ) -> None:
        """Put `value` at `path` of an activity's message (the whole message when no path)."""
        setting_id = self.source(setting)
        if setting_id == self.receiver_id:
            raise PermanentError("the received DICOM message cannot be changed")
        store = self.inbound if direction == Direction.Inbound else self.outbound
        current = store.get(setting_id, "")
        family = self._family(path_type, Direction.Outbound, setting_id)
        if not path or family == paths.TEXT:
            store[setting_id] = value
        elif family == paths.HL7:
            store[setting_id] = hl7.write(current, self._hl7_path(path), value)
        elif family == paths.JSON:
            document = _parse_json(current or "{}", setting_id)
            parsed = self._json_path(path)
            if not isinstance(parsed, paths.SlashPath):
                raise PermanentError(f"cannot write at a JMESPath expression: {path!r}")
            store[setting_id] = json.dumps(
                _json_set(document, self._rebound(parsed.steps), value), ensure_ascii=False
            )
        else:
            raise PermanentError(f"{family.upper()} paths are not supported yet: {path!r}")

    def append_line(self, setting: str | None, direction: Direction, line: str) -> None:
        setting_id = self.source(setting)
        store = self.inbound if direction == Direction.Inbound else self.outbound
        current = store.get(setting_id, "")
        separator = "\r" if self.message_type(setting_id) == MessageType.HL7V2 else "\n"
        if current and not current.endswith(("\r", "\n")):
            current += separator
        store[setting_id] = (
            current
            + line
            + (separator if self.message_type(setting_id) == MessageType.HL7V2 else "")
        )

    # -------------------------------------------------------------------------- helpers
    def _json_path(self, path: str) -> paths.SlashPath | paths.JmesPath:
        try:
            return paths.parse_json_path(path)
        except paths.PathError as exc:
            raise PermanentError(str(exc)) from None

    def _hl7_path(self, path: str) -> paths.Hl7Path:
        try:
            parsed = paths.parse_hl7_path(path)
        except paths.PathError as exc:
            raise PermanentError(str(exc)) from None
        for loop in self.loops:
            if (
                loop.family == paths.HL7
                and parsed.segment == loop.segment
                and parsed.segment_repeat == 1
            ):
                parsed = paths.Hl7Path(
                    parsed.segment,
                    loop.index,
                    parsed.field,
                    parsed.field_repeat,
                    parsed.component,
                    parsed.subcomponent,
                )
        return parsed

    def _rebound(self, steps: tuple[paths.JsonStep, ...]) -> tuple[paths.JsonStep, ...]:
        """Inside a ForEach, `[1]` (or no index) on the looped node means the current item."""
        for loop in self.loops:
            size = len(loop.steps)
            if loop.family != paths.JSON or not size or len(steps) < size:
                continue
            if [s.key for s in steps[:size]] == [s.key for s in loop.steps] and steps[
                size - 1
            ].index in (None, 1):
                steps = (
                    *steps[: size - 1],
                    paths.JsonStep(steps[size - 1].key, loop.index),
                    *steps[size:],
                )
        return steps

    def _json_value(
        self, setting_id: str, direction: Direction, path: str, *, whole_list: bool
    ) -> Any:
        parsed = self._json_path(path)
        if setting_id == self.receiver_id and direction == Direction.Inbound:
            document: Any = self.message
        else:
            document = _parse_json(self._text(setting_id, direction) or "null", setting_id)
        if isinstance(parsed, paths.JmesPath):
            return parsed.expression.search(document)
        return _json_get(document, self._rebound(parsed.steps), whole_list=whole_list)


def _parse_json(text: str, setting_id: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise PermanentError(f"the message of {setting_id} is not JSON") from None


def _json_get(document: Any, steps: tuple[paths.JsonStep, ...], *, whole_list: bool) -> Any:
    value = document
    for position, step in enumerate(steps):
        value = value.get(step.key) if isinstance(value, dict) else None
        last = position == len(steps) - 1
        if isinstance(value, list):
            if step.index is not None:
                value = value[step.index - 1] if step.index <= len(value) else None
            elif not (last and whole_list):
                value = value[0] if value else None
        elif step.index not in (None, 1):
            value = None
        if value is None:
            return None
    return value


def _json_set(document: Any, steps: tuple[paths.JsonStep, ...], value: str) -> Any:
    root = document if isinstance(document, dict) else {}
    node: Any = root
    for position, step in enumerate(steps):
        last = position == len(steps) - 1
        if step.index is None:
            if last:
                node[step.key] = value
                continue
            child = node.get(step.key)
            if not isinstance(child, dict):
                child = node[step.key] = {}
            node = child
            continue
        items = node.get(step.key)
        if not isinstance(items, list):
            items = node[step.key] = []
        while len(items) < step.index:
            items.append({})
        if last:
            items[step.index - 1] = value
        else:
            if not isinstance(items[step.index - 1], dict):
                items[step.index - 1] = {}
            node = items[step.index - 1]
    return root


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)
