"""What a schema cannot say: references resolve, ids and ports unique, pairs match. Pure.

Upstream: load. Every finding goes to the file's IssueSink with the JSON pointer it is about.
Per file (`check_workflow`): one receiver, unique ids, references of the right kind, AE
titles and the allow-list, filter-group and Begin/End/ForEach/Next structure, paths and
`${}` templates that parse, variables used but never set, code steps soupflow cannot run.
Across files (`check_folder`): `WorkflowId` and listening port unique. The one I/O: TLS
certificates, keys and passwords are loaded as the runtime loads them, so that a problem
points at its field instead of failing at start.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlparse, urlsplit

from soupflow import tls
from soupflow.network import Allowlist, Egress, EgressError
from soupflow.workflow import model, paths, template
from soupflow.workflow.jsonpos import pointer_join
from soupflow.workflow.types import (
    Direction,
    HttpAuthentication,
    PathType,
    StowAuthentication,
    StringComparer,
    normalize_reference,
)

if TYPE_CHECKING:
    from soupflow.workflow.load import Entry, LoadedWorkflow

_AE_HINT = "an AE title has 1-16 characters, no backslash and no control characters, PS3.5 6.2"
_PYTHON_CALLABLE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_REFERENCE = re.compile(r"^\s*\$\{\s*env:[A-Za-z_][A-Za-z0-9_]*\s*\}\s*$")

_JSON, _HL7, _TEXT, _OTHER = paths.JSON, paths.HL7, paths.TEXT, "other"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# tls.TlsError.field -> the setting's field, for a listener and for a sender
_TLS_LISTENER_FIELDS = {
    "certificate": "CertificateFile",
    "key": "PrivateKeyFile",
    "password": "PrivateKeyPassword",
    "trusted": "TrustedCertificatesFile",
}
_TLS_SENDER_FIELDS = {
    "certificate": "ClientCertificateFile",
    "key": "ClientPrivateKeyFile",
    "password": "ClientPrivateKeyPassword",
    "trusted": "TrustedCertificatesFile",
}


def ae_title_problem(title: str) -> str | None:
    """Why `title` is not a legal AE title, or None when it is."""
    if not title.strip():
        return "is empty"
    if len(title) > 16:
        return f"has {len(title)} characters; at most 16 are allowed"
    if "\\" in title:
        return "contains a backslash"
    if any(ord(char) < 32 or ord(char) == 127 for char in title):
        return "contains a control character"
    return None


def check_workflow(loaded: LoadedWorkflow) -> None:
    _WorkflowChecks(loaded).run()


def check_folder(workflows: Sequence[LoadedWorkflow]) -> None:
    """A WorkflowId and a port belong to one file: later files (by name) are refused."""
    ids: dict[str, LoadedWorkflow] = {}
    ports: dict[int, LoadedWorkflow] = {}
    for loaded in sorted(workflows, key=lambda w: str(w.path)):
        workflow_id = loaded.workflow_id
        if workflow_id is not None:
            if workflow_id in ids:
                loaded.sink.error(
                    "" if loaded.bare else "/WorkflowId",
                    f"WorkflowId {workflow_id} is already used by {ids[workflow_id].path}",
                    "each workflow needs its own id: give this file new GUIDs",
                )
            else:
                ids[workflow_id] = loaded
        receiver = loaded.receiver
        entry = _receiver_entry(loaded)
        if receiver is None or entry is None or receiver.disabled or receiver.port == 0:
            continue
        if "/Port" in entry.repaired or "/Disabled" in entry.repaired:
            continue  # the file's own error says what is wrong with it
        pointer = entry.pointer
        if receiver.port in ports:
            other = ports[receiver.port]
            loaded.sink.error(
                pointer_join(pointer, "Port"),
                f'port {receiver.port} is already used by workflow "{other.name}" in {other.path}',
                "one workflow per port: choose another Port",
            )
        else:
            ports[receiver.port] = loaded


def _receiver_entry(loaded: LoadedWorkflow) -> Entry | None:
    for entry in loaded.entries:
        if isinstance(entry.setting, model.ReceiverSetting):
            return entry
    return None


class _WorkflowChecks:
    def __init__(self, loaded: LoadedWorkflow) -> None:
        self.loaded = loaded
        self.sink = loaded.sink
        self.variables_set: set[str] = set()
        self.variables_used: list[tuple[str, template.Variable]] = []
        self.linked: set[str] = set()  # filters and transformers some setting links to

    # ------------------------------------------------------------------------- the run
    def run(self) -> None:
        self.structure()
        for entry in self.loaded.entries:
            setting = entry.setting
            if isinstance(setting, model.ReceiverSetting):
                self.receiver(entry, setting)
            elif isinstance(setting, model.SenderSetting):
                self.sender(entry, setting)
            elif isinstance(setting, model.FilterHostSetting):
                self.filter_host(entry, setting)
            elif isinstance(setting, model.TransformerSetting):
                self.actions(pointer_join(entry.pointer, "Transformers"), setting.transformers)
        self.unused_settings()
        self.variables()

    def structure(self) -> None:
        loaded = self.loaded
        seen: dict[str, Entry] = {}
        receivers = [entry for entry in loaded.entries if entry.kind == "receiver"]
        if (
            not loaded.bare
            and isinstance(loaded.document, dict)
            and isinstance(loaded.document.get("WorkflowPattern"), list)
        ):
            if not receivers:
                self.sink.error(
                    "/WorkflowPattern",
                    "no receiver: a workflow has exactly one (DicomReceiverSetting or "
                    "StowRsReceiverSetting)",
                )
            for extra in receivers[1:]:
                self.sink.error(
                    extra.pointer,
                    f"a second receiver: a workflow has exactly one (the first is at {receivers[0].pointer})",
                )
        for entry in loaded.entries:
            if entry.id is None:
                continue
            if entry.id in seen:
                self.sink.error(
                    pointer_join(entry.pointer, "Id"),
                    f"Id {entry.id} is already used by {seen[entry.id].label} at {seen[entry.id].pointer}",
                    "every setting needs its own GUID",
                )
            else:
                seen[entry.id] = entry
        receiver = loaded.receiver
        if receiver is None or loaded.bare or not isinstance(loaded.document, dict):
            return
        name, workflow_id = loaded.document.get("Name"), loaded.document.get("WorkflowId")
        if (
            isinstance(name, str)
            and receiver.workflow_pattern_name
            and name != receiver.workflow_pattern_name
        ):
            self.sink.warning(
                "/Name",
                f'Name "{name}" differs from the receiver\'s WorkflowPatternName "{receiver.workflow_pattern_name}"',
            )
        if isinstance(workflow_id, str) and normalize_reference(workflow_id) not in (
            None,
            normalize_reference(receiver.id),
        ):
            self.sink.warning(
                "/WorkflowId",
                f"WorkflowId differs from the receiver's Id {receiver.id}",
                "the original product keeps them equal",
            )

    # ---------------------------------------------------------------------- references
    def reference(
        self,
        pointer: str,
        value: str | None,
        kinds: tuple[str, ...],
        what: str,
        *,
        runs: bool = False,
    ) -> Entry | None:
        """Resolve a link; report a dangling one or one to a setting of the wrong kind.

        `runs`: the link makes the target run (Activities, Filters, Transformers).
        """
        target_id = normalize_reference(value)
        if target_id is None:
            return None
        if self.loaded.bare:
            self.sink.error(
                pointer,
                f"a bare receiver links nothing, but this links {target_id}",
                "use a workflow file (WorkflowPattern) to link settings, or the all-zero GUID",
            )
            return None
        target = self.loaded.setting(target_id)
        if target is None:
            known = [entry.id for entry in self.loaded.entries if entry.id and entry.kind in kinds]
            close = difflib.get_close_matches(target_id, known, n=1, cutoff=0.8)
            hint = (
                f"did you mean {close[0]}?"
                if close
                else f"no setting in this file has Id {target_id}"
            )
            self.sink.error(pointer, f"links to {target_id}, which is not in this file", hint)
            return None
        if target.kind not in kinds:
            self.sink.error(pointer, f"links to {target.label}, a {target.kind}; expected {what}")
            return None
        if runs:
            self.linked.add(target_id)
        return target

    def unused_settings(self) -> None:
        """Settings nothing runs (known only when the receiver's links could be read)."""
        receiver = _receiver_entry(self.loaded)
        if receiver is None or receiver.repaired:
            return
        for entry in self.loaded.entries:
            if entry.kind in ("sender", "filter", "transformer") and entry.id not in self.linked:
                why = (
                    "not in the receiver's Activities"
                    if entry.kind == "sender"
                    else "not linked from the receiver or an activity"
                )
                self.sink.warning(entry.pointer, f"{entry.label} is {why}: it never runs")

    # ------------------------------------------------------------------------ receiver
    def receiver(self, entry: Entry, receiver: model.ReceiverSetting) -> None:
        pointer = entry.pointer
        if isinstance(receiver, model.DicomReceiverSetting):
            self.ae_title(pointer_join(pointer, "OurAET"), receiver.our_aet)
            self.allow_list(
                pointer_join(pointer, "AcceptedCallingAETs"), receiver.accepted_calling_aets
            )
        elif isinstance(receiver, model.StowRsReceiverSetting):
            self.stow_receiver(pointer, receiver)
        self.reference(
            pointer_join(pointer, "Filters"),
            receiver.filters,
            ("filter",),
            "a FilterHostSetting",
            runs=True,
        )
        self.reference(
            pointer_join(pointer, "VariableTransformers"),
            receiver.variable_transformers,
            ("transformer",),
            "a TransformerSetting",
            runs=True,
        )
        if self.reference(
            pointer_join(pointer, "Transformers"),
            receiver.transformers,
            ("transformer",),
            "a TransformerSetting",
        ):
            self.sink.warning(
                pointer_join(pointer, "Transformers"),
                "a DICOM receiver sends no response, so its Transformers have no effect",
                "use VariableTransformers",
            )
        seen: set[str] = set()
        for index, activity in enumerate(receiver.activities):
            item = pointer_join(pointer_join(pointer, "Activities"), index)
            target = self.reference(item, activity, ("sender",), "a sender (activity)", runs=True)
            if target is not None and target.id in seen:
                self.sink.warning(
                    item, f"{target.label} is listed twice in Activities: it runs twice per message"
                )
            if target is not None and target.id:
                seen.add(target.id)
        self.listener_tls(pointer, receiver)

    def stow_receiver(self, pointer: str, receiver: model.StowRsReceiverSetting) -> None:
        name = receiver.service_name.strip()
        if not name or name.startswith("/") or name.endswith("/") or "?" in name:
            self.sink.error(
                pointer_join(pointer, "ServiceName"),
                f"ServiceName {receiver.service_name!r} is not a path prefix",
                "write it without a leading or trailing slash, e.g. dicom-web",
            )
        kind = receiver.authentication_type
        if kind == StowAuthentication.Basic and not receiver.user_name.strip():
            self.sink.error(
                pointer_join(pointer, "UserName"), "AuthenticationType 1 needs UserName"
            )
        if kind == StowAuthentication.Bearer and not receiver.bearer_token.strip():
            self.sink.error(
                pointer_join(pointer, "BearerToken"), "AuthenticationType 3 needs BearerToken"
            )
        self.secret(pointer_join(pointer, "Password"), receiver.password)
        self.secret(pointer_join(pointer, "BearerToken"), receiver.bearer_token)
        for header, variable in receiver.header_parameters.items():
            if not variable.strip() or not header.strip():
                self.sink.error(
                    pointer_join(pointer_join(pointer, "HeaderParameters"), header),
                    "a HeaderParameters entry maps a header name to a variable name",
                )
            else:
                self.variables_set.add(variable.strip().lower())

    def listener_tls(self, pointer: str, receiver: model.ReceiverSetting) -> None:
        """TLS fields that fit together, and files that load (the runtime's own loader)."""
        mutual = receiver.mutual_tls
        at = {name: pointer_join(pointer, field) for name, field in _TLS_LISTENER_FIELDS.items()}
        if not receiver.use_ssl:
            if mutual:
                self.sink.error(
                    pointer_join(pointer, "AuthenticationType"),
                    "AuthenticationType 2 (client certificates) needs UseSsl true",
                )
            return
        if not receiver.certificate_file.strip() or not receiver.private_key_file.strip():
            self.sink.error(
                at["certificate"],
                "UseSsl needs CertificateFile and PrivateKeyFile (PEM)",
                "make a certificate for this host; the README's Security section shows how",
            )
            return
        if mutual and not receiver.trusted_certificates_file.strip():
            self.sink.error(
                at["trusted"],
                "AuthenticationType 2 needs TrustedCertificatesFile: the CA or peer "
                "certificates client certificates are verified against",
            )
            return
        for fingerprint in receiver.client_certificate_thumb_print.split(","):
            if fingerprint.strip() and not _SHA256.match(tls.normalized_fingerprint(fingerprint)):
                self.sink.error(
                    pointer_join(pointer, "ClientCertificateThumbPrint"),
                    f"{fingerprint.strip()!r} is not a SHA-256 fingerprint (64 hex digits)",
                )
        if receiver.client_certificate_thumb_print.strip() and not mutual:
            self.sink.error(
                pointer_join(pointer, "ClientCertificateThumbPrint"),
                "ClientCertificateThumbPrint needs AuthenticationType 2 (a client certificate)",
            )
        self.secret(at["password"], receiver.private_key_password)
        folder = self.loaded.path.parent
        try:
            tls.server_context(tls.listener_tls(receiver, mutual, folder))
        except tls.TlsError as exc:
            self.sink.error(at[exc.field], str(exc))

    def ae_title(self, pointer: str, title: str) -> None:
        problem = ae_title_problem(title)
        if problem:
            self.sink.error(pointer, f"AE title {title!r} {problem}", _AE_HINT)

    def allow_list(self, pointer: str, allow_list: str) -> None:
        if not allow_list.strip():
            self.sink.warning(
                pointer,
                "empty allow-list: every calling AE is rejected",
                'use "*" to accept anyone, or list the AE titles',
            )
            return
        seen: set[str] = set()
        for token in allow_list.split(","):
            title = token.strip()
            if not title:
                self.sink.warning(pointer, f"empty entry in {allow_list!r} (two commas in a row?)")
                continue
            if title == "*":
                continue
            problem = ae_title_problem(title)
            if problem:
                self.sink.error(
                    pointer,
                    f"allow-list entry {title!r} {problem}",
                    f"entries are AE titles separated by commas; {_AE_HINT}",
                )
            elif title.upper() in seen:
                self.sink.warning(
                    pointer,
                    f"allow-list entry {title!r} appears twice (entries are case-insensitive)",
                )
            seen.add(title.upper())

    # ------------------------------------------------------------------------- senders
    def sender(self, entry: Entry, sender: model.SenderSetting) -> None:
        pointer = entry.pointer
        self.reference(
            pointer_join(pointer, "Filters"),
            sender.filters,
            ("filter",),
            "a FilterHostSetting",
            runs=True,
        )
        self.reference(
            pointer_join(pointer, "Transformers"),
            sender.transformers,
            ("transformer",),
            "a TransformerSetting",
            runs=True,
        )
        for name in sender.TEMPLATE_FIELDS:
            self.template(pointer_join(pointer, model.format_alias(name)), getattr(sender, name))
        for index, header in enumerate(getattr(sender, "headers", [])):
            self.template(
                pointer_join(pointer_join(pointer_join(pointer, "Headers"), index), "Value"),
                header.value,
            )
        if isinstance(sender, model.DicomSenderSetting):
            self.ae_title(pointer_join(pointer, "OurAET"), sender.our_aet)
            self.ae_title(pointer_join(pointer, "RemoteAET"), sender.remote_aet)
            if sender.use_ssl:
                self.sender_tls(pointer, sender)
        elif isinstance(sender, model.FileWriterSenderSetting):
            if not sender.file_path_to_write.strip():
                self.sink.error(
                    pointer_join(pointer, "FilePathToWrite"),
                    "FilePathToWrite is empty: there is nowhere to write",
                )
            if sender.move_into_directory_on_complete and not sender.directory_to_move_into.strip():
                self.sink.error(
                    pointer_join(pointer, "DirectoryToMoveInto"),
                    "MoveIntoDirectoryOnComplete is on but DirectoryToMoveInto is empty",
                )
        elif isinstance(sender, model.HttpSenderSetting):
            self.url(pointer_join(pointer, "Server"), sender.server)
            self.sender_tls(pointer, sender)
            self.secret(pointer_join(pointer, "Password"), sender.password)
            if (
                sender.authentication_mode == HttpAuthentication.OAuth2ClientCredentials
                and not sender.token_url.strip()
            ):
                self.sink.error(
                    pointer_join(pointer, "TokenUrl"),
                    "OAuth2 client credentials need TokenUrl (the token endpoint)",
                )
        elif isinstance(sender, model.StowRsSenderSetting):
            self.url(pointer_join(pointer, "BaseUrl"), sender.base_url)
            self.sender_tls(pointer, sender)
            self.secret(pointer_join(pointer, "Password"), sender.password)
            self.secret(pointer_join(pointer, "BearerToken"), sender.bearer_token)
        elif isinstance(sender, model.MLLPSenderSetting):
            if sender.use_ssl:
                self.sender_tls(pointer, sender)
            for name, frame in (("FrameStart", sender.frame_start), ("FrameEnd", sender.frame_end)):
                if not frame:
                    self.sink.error(
                        pointer_join(pointer, name), f"{name} is empty: MLLP frames need it"
                    )
        elif isinstance(sender, model.CodeSenderSetting):
            self.code(pointer, sender)

    def sender_tls(self, pointer: str, sender: model.ClientTlsFields) -> None:
        """A sender's client certificate and trusted files load."""
        at = {name: pointer_join(pointer, field) for name, field in _TLS_SENDER_FIELDS.items()}
        self.secret(at["password"], sender.client_private_key_password)
        if bool(sender.client_certificate_file.strip()) != bool(
            sender.client_private_key_file.strip()
        ):
            self.sink.error(
                at["certificate"],
                "a client certificate needs both ClientCertificateFile and ClientPrivateKeyFile",
            )
            return
        files = (sender.trusted_certificates_file, sender.client_certificate_file)
        if not any(name.strip() for name in files) and not getattr(sender, "use_ssl", False):
            return  # plain, or the system store only: nothing of ours to load
        try:
            tls.client_context(tls.sender_tls(sender, "", self.loaded.path.parent))
        except tls.TlsError as exc:
            self.sink.error(at[exc.field], str(exc))

    def url(self, pointer: str, url: str) -> None:
        if "${" in url:
            return
        parsed = urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.sink.error(pointer, f"{url!r} is not an http:// or https:// URL")

    def secret(self, pointer: str, value: str) -> None:
        if value and not _ENV_REFERENCE.match(value):
            self.sink.warning(
                pointer,
                "a secret is written in the workflow file",
                "use ${env:NAME} and set NAME in the runtime's environment",
            )

    def code(self, pointer: str, step: model.CodeFields) -> None:
        if step.python_callable:
            if not _PYTHON_CALLABLE.match(step.python_callable):
                self.sink.error(
                    pointer_join(pointer, "PythonCallable"),
                    f"{step.python_callable!r} is not `package.module:function`",
                )
        elif step.code.strip():
            self.sink.error(
                pointer_join(pointer, "Code"),
                "C# code is not run by soupflow",
                "set PythonCallable to `package.module:function` with the same logic",
            )
        else:
            self.sink.error(
                pointer,
                "a code step with nothing to run",
                "set PythonCallable to `package.module:function`",
            )

    # ----------------------------------------------------------------- filters, actions
    def filter_host(self, entry: Entry, host: model.FilterHostSetting) -> None:
        self.actions(pointer_join(entry.pointer, "Transformers"), host.transformers)
        self.filter_items(pointer_join(entry.pointer, "Filters"), host.filters)

    def filter_items(self, pointer: str, items: Sequence[model.FilterItem]) -> None:
        for index, item in enumerate(items):
            item_pointer = pointer_join(pointer, index)
            if isinstance(item, model.FilterGroup):
                where = "first" if index == 0 else "last" if index == len(items) - 1 else ""
                if where:
                    self.sink.error(
                        item_pointer,
                        f"a FilterGroup marker cannot be {where} in the list",
                        "a group runs from its marker to the next marker; put items on both sides",
                    )
                elif isinstance(items[index - 1], model.FilterGroup):
                    self.sink.error(
                        item_pointer, "two FilterGroup markers in a row make an empty group"
                    )
                continue
            if (
                isinstance(item, model.StringMessageFilter)
                and item.comparer == StringComparer.InDataTable
            ):
                self.sink.error(
                    pointer_join(item_pointer, "Comparer"),
                    "Comparer 8 InDataTable is not supported by soupflow",
                    "use 12 InList with a comma-separated Value",
                )
            self.source(
                item_pointer,
                "Path",
                item.path,
                item.from_type,
                item.from_direction,
                item.from_setting,
            )
            if item.value:
                self.template(pointer_join(item_pointer, "Value"), item.value)
            elif item.to_path:
                self.source(
                    item_pointer,
                    "ToPath",
                    item.to_path,
                    item.to_type,
                    item.to_direction,
                    item.to_setting,
                )

    def actions(self, pointer: str, actions: Sequence[model.Action]) -> None:
        for action in actions:
            if (
                isinstance(action, model.CreateVariableTransformerAction)
                and action.variable_name.strip()
            ):
                self.variables_set.add(action.variable_name.strip().lower())
        blocks: list[tuple[str, model.Action]] = []
        for index, action in enumerate(actions):
            item = pointer_join(pointer, index)
            self.action(item, action)
            if isinstance(
                action, model.BeginConditionalTransformerAction | model.ForEachTransformerAction
            ):
                blocks.append((item, action))
            elif isinstance(
                action, model.EndConditionalTransformerAction | model.NextTransformerAction
            ):
                opener = (
                    model.BeginConditionalTransformerAction
                    if isinstance(action, model.EndConditionalTransformerAction)
                    else model.ForEachTransformerAction
                )
                closer = type(action).__name__.removesuffix("TransformerAction")
                if not blocks:
                    self.sink.error(
                        item,
                        f"{closer} without a matching {opener.__name__.removesuffix('TransformerAction')}",
                    )
                elif not isinstance(blocks[-1][1], opener):
                    open_pointer, open_action = blocks[-1]
                    self.sink.error(
                        item,
                        f"{closer} closes the {type(open_action).__name__.removesuffix('TransformerAction')} at {open_pointer}",
                        "blocks nest: close the inner block first",
                    )
                    blocks.pop()
                else:
                    blocks.pop()
        for open_pointer, open_action in blocks:
            closer = (
                "an EndConditional"
                if isinstance(open_action, model.BeginConditionalTransformerAction)
                else "a Next"
            )
            self.sink.error(
                open_pointer,
                f"{type(open_action).__name__.removesuffix('TransformerAction')} is never closed by {closer}",
            )

    def action(self, pointer: str, action: model.Action) -> None:
        if isinstance(action, model.CreateVariableTransformerAction):
            if not action.variable_name.strip():
                self.sink.error(pointer_join(pointer, "VariableName"), "VariableName is empty")
            self.source(
                pointer,
                "FromPath",
                action.from_path,
                action.from_type,
                action.from_direction,
                action.from_setting,
            )
        elif isinstance(action, model.CreateMappingTransformerAction):
            self.source(
                pointer,
                "FromPath",
                action.from_path,
                action.from_type,
                action.from_direction,
                action.from_setting,
            )
            target = self.reference(
                pointer_join(pointer, "ToSetting"),
                action.to_setting,
                ("receiver", "sender"),
                "an activity",
            )
            family = self.family(action.to_type, action.to_direction, target)
            self.path(pointer_join(pointer, "ToPath"), action.to_path, family)
        elif isinstance(action, model.ForEachTransformerAction):
            self.source(
                pointer,
                "FromPath",
                action.from_path,
                action.from_type,
                action.from_direction,
                action.from_setting,
            )
        elif isinstance(action, model.AppendLineTransformerAction):
            self.source(
                pointer,
                "FromPath",
                action.from_path,
                action.from_type,
                action.from_direction,
                action.from_setting,
            )
            self.reference(
                pointer_join(pointer, "ToSetting"),
                action.to_setting,
                ("receiver", "sender"),
                "an activity",
            )
        elif isinstance(action, model.BeginConditionalTransformerAction):
            self.filter_items(pointer_join(pointer, "Filters"), action.filters)
        elif isinstance(action, model.CodeTransformerAction):
            self.code(pointer, action)

    # ------------------------------------------------------------------ paths, templates
    def source(
        self,
        pointer: str,
        field: str,
        path: str,
        path_type: PathType | None,
        direction: Direction,
        setting: str | None,
    ) -> None:
        """A value read from `path` of the message that `setting`/`direction` name."""
        key = "FromSetting" if field in ("Path", "FromPath") else "ToSetting"
        source = None
        if direction != Direction.Variable:
            source = self.reference(
                pointer_join(pointer, key), setting, ("receiver", "sender"), "an activity"
            )
        self.path(pointer_join(pointer, field), path, self.family(path_type, direction, source))

    def family(self, path_type: PathType | None, direction: Direction, source: Entry | None) -> str:
        setting = source.setting if source else None
        message_type = setting.message_type if isinstance(setting, model.SenderSetting) else None
        found = paths.family(path_type, direction, message_type)
        if found in (paths.XML, paths.CSV):
            return _OTHER
        return found

    def path(self, pointer: str, path: str, family: str) -> None:
        if not path:
            return
        if family == _TEXT:
            self.template(pointer, path)
            return
        try:
            if family == _JSON:
                paths.parse_json_path(path)
            elif family == _HL7:
                paths.parse_hl7_path(path)
        except paths.PathError as exc:
            hint = (
                "set the path type (FromType/ToType) to match the path"
                if family == _HL7 and "/" in path
                else ""
            )
            self.sink.error(pointer, str(exc), hint)

    def template(self, pointer: str, text: str) -> None:
        try:
            parts = template.parse_template(text)
        except template.TemplateError as exc:
            self.sink.error(
                pointer, f"template does not parse at character {exc.offset + 1}: {exc.message}"
            )
            return
        for part in parts:
            if isinstance(part, template.Variable):
                self.variables_used.append((pointer, part))
            elif isinstance(part, template.ActivityMessage):
                self.reference(pointer, part.setting_id, ("receiver", "sender"), "an activity")
            elif isinstance(part, template.EnvironmentVariable) and part.name not in os.environ:
                self.sink.warning(
                    pointer,
                    f"environment variable {part.name} is not set here",
                    "set it in the runtime's environment before `soupflow run`",
                )

    def variables(self) -> None:
        known = self.variables_set | template.BUILT_IN_VARIABLES
        for pointer, variable in self.variables_used:
            if variable.key in known:
                continue
            close = difflib.get_close_matches(variable.key, sorted(known), n=1, cutoff=0.75)
            hint = (
                f"did you mean ${{{close[0]}}}?" if close else "a CreateVariable action must set it"
            )
            self.sink.warning(
                pointer, f'variable ${{{variable.name}}} is never set, so it expands to ""', hint
            )


Problem = tuple[str, str, str]  # (pointer, message, hint)


def check_egress(loaded: LoadedWorkflow, egress: Egress) -> None:
    """Every destination written in the file (not built from `${}`) must be allowed by the
    operator's allowlists; loopback always is. Templated ones are checked at send time."""
    for problem in egress_problems(loaded, egress):
        loaded.sink.error(*problem)


def egress_problems(loaded: LoadedWorkflow, egress: Egress) -> list[Problem]:
    """What `check_egress` reports (a name only address entries could allow is looked up)."""
    problems: list[Problem] = []
    for entry in loaded.entries:
        setting = entry.setting
        tcp: list[tuple[str, str, int]] = []
        urls: list[tuple[str, str]] = []
        if isinstance(setting, model.DicomSenderSetting):
            tcp.append(("RemoteHost", setting.remote_host, setting.remote_port))
        elif isinstance(setting, model.MLLPSenderSetting):
            tcp.append(("Server", setting.server, setting.port))
        elif isinstance(setting, model.HttpSenderSetting):
            urls += [("Server", setting.server), ("TokenUrl", setting.token_url)]
        elif isinstance(setting, model.StowRsSenderSetting):
            urls.append(("BaseUrl", setting.base_url))
        for field, host, port in tcp:
            problems += _destination(entry, field, egress.tcp, host.strip(), port)
        for field, url in urls:
            text = url.strip()
            if not text or "${" in text or egress.http.allows_url(text):
                continue
            parts = urlsplit(text)
            if parts.hostname:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                problems += _destination(entry, field, egress.http, parts.hostname, port)
    return problems


def _destination(
    entry: Entry, field: str, allowlist: Allowlist, host: str, port: int
) -> list[Problem]:
    if not host or "${" in host:
        return []
    allowed = allowlist.allowed_without_lookup(host, port)
    if allowed is None:  # only address entries could allow it: look the name up
        try:
            allowlist.address(host, port)
            allowed = True
        except EgressError:
            allowed = False
    if allowed:
        return []
    return [
        (
            pointer_join(entry.pointer, field),
            f"{host}:{port} is not an allowed destination ({allowlist.option}: {allowlist})",
            f"the operator allows it with {allowlist.option} {host}:{port} (or a CIDR); "
            "a workflow file cannot",
        )
    ]
