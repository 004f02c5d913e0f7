"""Pydantic models of the workflow file format; the `$type` unions. Upstream: load. Pure.

The one source of truth for field names, defaults and documentation: `schemas/` is generated
from these classes (see `schema.py`). Python attributes are snake_case; the format's
PascalCase names are their aliases (`our_aet` <-> `OurAET`). Every model keeps fields it does
not know (`extra="allow"`), because `fmt` must never lose a field and unknown fields are
warnings, not errors.
"""

from __future__ import annotations

import re
import types
import typing
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema

from soupflow.workflow.types import (
    BearerAuthentication,
    Bool,
    Conjunction,
    DateComparer,
    Direction,
    EnumNumberOrName,
    Guid,
    HttpAuthentication,
    HttpMethod,
    Int,
    ListenerAuthentication,
    MessageType,
    MllpAuthentication,
    PathType,
    Reference,
    StowAuthentication,
    Str,
    StringComparer,
    TextFormat,
    Truncation,
    ValidComparer,
    ValueEncoding,
    polymorphic_schema,
    type_pattern,
)

_ALIAS_WORDS = {"aet": "AET", "aets": "AETs"}

# Fields the format stores for its desktop UI or for features soupflow does not have; they
# are accepted and ignored (never "unknown field" warnings).
IGNORED_FIELDS = frozenset(
    {
        "AddIncomingMessageToCurrentTab",
        "TransformersNotAvailable",
        "SampleVariableValue",
        "PairId",
        "Version",
        "LastModified",
        "ReceivedMessageTemplate",
        "ResponseMessageTemplate",
        "ResponseMessageType",
        "DifferentResponseMessageType",
        "ReponsePriority",
        "FromNamespaces",
        "ToNamespaces",
        "UseProxy",
        "ProxyAddress",
        "ProxyUserName",
        "ProxyPassword",
        # The original product writes FromType on every transformer action, also on those
        # that read no path (BeginConditional, Next, ...).
        "FromType",
    }
)


def format_alias(attribute: str) -> str:
    """`accepted_calling_aets` -> `AcceptedCallingAETs`; a trailing `_` is dropped (`not_`)."""
    return "".join(
        _ALIAS_WORDS.get(word, word.capitalize()) for word in attribute.strip("_").split("_")
    )


class FormatModel(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        alias_generator=format_alias,
        regex_engine="python-re",
        frozen=True,
    )


def _type_field(type_name: str, *, required: bool = True) -> Any:
    description = f'"{type_name}, HL7SoupWorkflow" (the assembly part after the comma may differ)'
    if required:
        return Field(alias="$type", pattern=type_pattern(type_name), description=description)
    return Field(
        f"{type_name}, HL7SoupWorkflow",
        alias="$type",
        pattern=type_pattern(type_name),
        description=description,
    )


# ---------------------------------------------------------------------------- enum fields
MessageTypeField = Annotated[MessageType, EnumNumberOrName("The activity message's type")]
PathTypeField = Annotated[PathType, EnumNumberOrName("How the path is read")]
DirectionField = Annotated[Direction, EnumNumberOrName("Which side of the linked activity is read")]
ConjunctionField = Annotated[Conjunction, EnumNumberOrName("How this item joins the next one")]


class Setting(FormatModel):
    """A top-level entry of `WorkflowPattern`: has a `$type` and an `Id`."""

    TYPE_NAME: ClassVar[str]
    KIND: ClassVar[str]
    type_: Str
    id: Guid = Field(description="This setting's GUID; other settings link to it by this value.")
    name: Str = Field("", description="Display name; `diff` and error messages use it.")


# ----------------------------------------------------------------- message type options
class DicomMessageTypeOptions(FormatModel):
    """Which nodes the DICOM message carries (see dicom-message.md)."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Workflow.MessageTypeOptions.DicomMessageTypeOptions"
    type_: Str = _type_field(TYPE_NAME, required=False)
    include_common_fields_node: Bool = Field(True, description="Include `CommonFields`.")
    include_report_node: Bool = Field(True, description="Include `Report` for SR documents.")
    include_tags_node: Bool = Field(True, description="Include `Tags`.")
    tags_format: Literal["Keyword", "DicomJson"] = Field(
        "Keyword",
        description="soupflow extension: `Keyword` (keyed by DICOM keyword) or `DicomJson` "
        "(the PS3.18 F.2 DICOM JSON model, bulk data left out).",
    )


# ------------------------------------------------------------------------- filter items
class SourceFields(FormatModel):
    """Where a value is read: `FromSetting` + `FromDirection` + `FromType` + the path."""

    from_setting: Reference = Field(
        None,
        description="Id of the activity whose message is read (the receiver for the "
        "received DICOM message); all-zero with `FromDirection` 2.",
    )
    from_direction: DirectionField = Field(
        Direction.Inbound, description="0 inbound, 1 outbound, 2 text with variables."
    )
    from_type: PathTypeField | None = Field(
        None,
        description="How the path is read; absent = as the source message's type (a JSON "
        "path for the DICOM message).",
    )


class FilterItem(SourceFields):
    TYPE_NAME: ClassVar[str]
    type_: Str
    path: Str = Field("", description="Left operand: a path into the source message.")
    not_: Bool = Field(False, description="Negate this item (a group marker: the whole group).")
    conjunction: ConjunctionField = Field(
        Conjunction.And, description="How this item joins the NEXT one: 0 And, 1 Or."
    )
    value: Str = Field("", description="Right operand, with `${}` variables; wins when set.")
    to_path: Str = Field("", description="Right operand as a path, used when `Value` is empty.")
    to_setting: Reference = Field(None, description="Activity the right operand path reads.")
    to_direction: DirectionField = Field(Direction.Inbound, description="Side read by ToPath.")
    to_type: PathTypeField | None = Field(None, description="How `ToPath` is read.")


class StringMessageFilter(FilterItem):
    """Compare a value as text."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.MessageFilters.StringMessageFilter"
    type_: Str = _type_field(TYPE_NAME)
    comparer: Annotated[StringComparer, EnumNumberOrName("The comparison")] = StringComparer.Equals
    case_sensitive: Bool = Field(False, description="Compare case-sensitively.")


class DateMessageFilter(FilterItem):
    """Compare a value as a date (DICOM DA/DT/TM or ISO 8601)."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.MessageFilters.DateMessageFilter"
    type_: Str = _type_field(TYPE_NAME)
    comparer: Annotated[DateComparer, EnumNumberOrName("The comparison")] = DateComparer.Equals


class ValidMessageFilter(FilterItem):
    """Whether the received object parsed as a well-formed DICOM dataset."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.MessageFilters.ValidMessageFilter"
    type_: Str = _type_field(TYPE_NAME)
    comparer: Annotated[ValidComparer, EnumNumberOrName("The check")] = ValidComparer.Valid


class FilterGroup(FilterItem):
    """Opens a bracket that runs to the next FilterGroup item or the end of the list."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.MessageFilters.FilterGroup"
    type_: Str = _type_field(TYPE_NAME)


FILTER_ITEM_CLASSES: tuple[type[FilterItem], ...] = (
    StringMessageFilter,
    DateMessageFilter,
    ValidMessageFilter,
    FilterGroup,
)
FILTER_ITEMS_BY_NAME = {cls.__name__: cls for cls in FILTER_ITEM_CLASSES}


def _discriminator(classes: tuple[type[Any], ...]) -> Discriminator:
    """Pick the member whose `$type` pattern matches (the same regex the schema uses)."""
    patterns = [(re.compile(type_pattern(cls.TYPE_NAME)), cls.__name__) for cls in classes]

    def tag(value: Any) -> str | None:
        type_name = value.get("$type") if isinstance(value, dict) else getattr(value, "type_", None)
        if isinstance(type_name, str):
            for pattern, name in patterns:
                if pattern.search(type_name):
                    return name
        return None

    return Discriminator(tag)


def _members(classes: tuple[type[Any], ...]) -> list[tuple[str, str]]:
    return [(cls.TYPE_NAME, cls.__name__) for cls in classes]


AnyFilterItem = Annotated[
    Annotated[StringMessageFilter, Tag("StringMessageFilter")]
    | Annotated[DateMessageFilter, Tag("DateMessageFilter")]
    | Annotated[ValidMessageFilter, Tag("ValidMessageFilter")]
    | Annotated[FilterGroup, Tag("FilterGroup")],
    _discriminator(FILTER_ITEM_CLASSES),
    WithJsonSchema(polymorphic_schema(_members(FILTER_ITEM_CLASSES))),
]


# --------------------------------------------------------------------- transformer actions
class FormattingFields(FormatModel):
    """Applied in this order when the value is read."""

    format: Str = Field("", description="A .NET date/number pattern (yyyyMMddHHmmss, 0.00).")
    text_format: Annotated[TextFormat, EnumNumberOrName("Change case")] = TextFormat.none
    truncation: Annotated[Truncation, EnumNumberOrName("Truncate the value")] = Truncation.none
    truncation_length: Int = Field(0, ge=0, description="Length kept by `Truncation`.")
    remove: Str = Field("", description="Text removed from the value.")
    replace: Str = Field("", description="Text replaced by `ReplaceWith`.")
    replace_with: Str = Field("", description="Replacement for `Replace`.")
    padding_length: Int = Field(0, ge=0, description="Pad the value to this length.")
    encoding: Annotated[ValueEncoding, EnumNumberOrName("Encode or decode the value")] = (
        ValueEncoding.none
    )


class Action(FormatModel):
    TYPE_NAME: ClassVar[str]
    type_: Str


class CreateVariableTransformerAction(Action, SourceFields, FormattingFields):
    """Set a workflow variable, read as `${VariableName}` afterwards."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.CreateVariableTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    variable_name: Str = Field("", description="The variable set (names are case-insensitive).")
    from_path: Str = Field("", description="Path read, or text with `${}` for FromDirection 2.")


class CreateMappingTransformerAction(Action, SourceFields, FormattingFields):
    """Write a value into the current activity's message at `ToPath`."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.CreateMappingTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    from_path: Str = Field("", description="Path read, or text with `${}` for FromDirection 2.")
    to_path: Str = Field("", description="Where to write: JSON slash path, HL7 path (PID-5.1).")
    to_setting: Reference = Field(None, description="The activity whose message is written.")
    to_direction: DirectionField = Field(Direction.Outbound, description="Side written.")
    to_type: PathTypeField | None = Field(None, description="How `ToPath` is read.")


class BeginConditionalTransformerAction(Action):
    """Run the actions up to the matching EndConditional only when the filters pass."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.BeginConditionalTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    filters: list[AnyFilterItem] = Field([], description="Inline filter items.")


class EndConditionalTransformerAction(Action):
    """Closes the innermost BeginConditional."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.EndConditionalTransformerAction"
    type_: Str = _type_field(TYPE_NAME)


class ForEachTransformerAction(Action, SourceFields):
    """Repeat the actions up to the matching Next for each item of a repeating node."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.ForEachTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    from_path: Str = Field(
        "", description="The repeating node; `[1]` on it means the current item."
    )


class NextTransformerAction(Action):
    """Closes the innermost ForEach."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.NextTransformerAction"
    type_: Str = _type_field(TYPE_NAME)


class AppendLineTransformerAction(Action, SourceFields):
    """Append a line (an HL7 segment, a CSV line) to the current activity's message."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.AppendLineTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    from_path: Str = Field("", description="The line, usually text with `${}` variables.")
    to_setting: Reference = Field(None, description="The activity whose message gets the line.")
    to_direction: DirectionField = Field(Direction.Outbound, description="Side written.")


class CommentTransformerAction(Action):
    """Does nothing; documents the transformer list."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.CommentTransformerAction"
    type_: Str = _type_field(TYPE_NAME)
    comment: Str = Field("", description="The comment.")


class CodeFields(FormatModel):
    code: Str = Field("", description="C# code of the original product: not run by soupflow.")
    python_callable: Str = Field(
        "", description="soupflow extension: `package.module:function` run instead of `Code`."
    )
    timeout_seconds: Int = Field(
        30,
        ge=1,
        description="soupflow extension: the time limit of one call; past it the call is"
        " stopped and the message is dead.",
    )


class CodeTransformerAction(Action, CodeFields):
    """Run code; soupflow runs `PythonCallable`."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.CodeTransformerAction"
    type_: Str = _type_field(TYPE_NAME)


ACTION_CLASSES: tuple[type[Action], ...] = (
    CreateVariableTransformerAction,
    CreateMappingTransformerAction,
    BeginConditionalTransformerAction,
    EndConditionalTransformerAction,
    ForEachTransformerAction,
    NextTransformerAction,
    AppendLineTransformerAction,
    CommentTransformerAction,
    CodeTransformerAction,
)

AnyAction = Annotated[
    Annotated[CreateVariableTransformerAction, Tag("CreateVariableTransformerAction")]
    | Annotated[CreateMappingTransformerAction, Tag("CreateMappingTransformerAction")]
    | Annotated[BeginConditionalTransformerAction, Tag("BeginConditionalTransformerAction")]
    | Annotated[EndConditionalTransformerAction, Tag("EndConditionalTransformerAction")]
    | Annotated[ForEachTransformerAction, Tag("ForEachTransformerAction")]
    | Annotated[NextTransformerAction, Tag("NextTransformerAction")]
    | Annotated[AppendLineTransformerAction, Tag("AppendLineTransformerAction")]
    | Annotated[CommentTransformerAction, Tag("CommentTransformerAction")]
    | Annotated[CodeTransformerAction, Tag("CodeTransformerAction")],
    _discriminator(ACTION_CLASSES),
    WithJsonSchema(polymorphic_schema(_members(ACTION_CLASSES))),
]


# ------------------------------------------------------------------ filter and transformer hosts
class FilterHostSetting(Setting):
    """A filter: inline transformers run first, then the items as one boolean expression."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Filters.FilterHostSetting"
    KIND: ClassVar[str] = "filter"
    type_: Str = _type_field(TYPE_NAME)
    filters: list[AnyFilterItem] = Field([], description="The items; an empty list passes.")
    transformers: list[AnyAction] = Field([], description="Actions run before the items.")


class TransformerSetting(Setting):
    """An ordered list of transformer actions."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.TransformerSetting"
    KIND: ClassVar[str] = "transformer"
    type_: Str = _type_field(TYPE_NAME)
    transformers: list[AnyAction] = Field([], description="The actions, run in order.")


# ------------------------------------------------------------------------------ TLS
TlsVersion = Literal["1.2", "1.3"]


class ListenerTlsFields(FormatModel):
    """soupflow extensions: TLS on a listener's port (the port speaks TLS only)."""

    use_ssl: Bool = Field(False, description="soupflow extension: the port speaks TLS only.")
    certificate_file: Str = Field(
        "", description="soupflow extension: our certificate chain (PEM), with UseSsl."
    )
    private_key_file: Str = Field(
        "", description="soupflow extension: its private key (PEM), with UseSsl."
    )
    private_key_password: Str = Field(
        "", description="soupflow extension: the key's password; use `${env:NAME}`."
    )
    trusted_certificates_file: Str = Field(
        "",
        description="soupflow extension: CA or peer certificates (PEM) client certificates "
        "are verified against; required with AuthenticationType 2.",
    )
    client_certificate_thumb_print: Str = Field(
        "",
        description="soupflow extension: comma-separated SHA-256 fingerprints of the client "
        "certificates allowed, matched exactly; empty = any the trusted certificates verify.",
    )
    tls_minimum_version: TlsVersion = Field(
        "1.2", description="soupflow extension: the oldest TLS version accepted."
    )


class ClientTlsFields(FormatModel):
    """soupflow extensions: TLS from a sender, with an optional client certificate."""

    trusted_certificates_file: Str = Field(
        "",
        description="soupflow extension: CA certificates (PEM) the server is verified "
        "against, besides the system store.",
    )
    client_certificate_file: Str = Field(
        "", description="soupflow extension: our client certificate chain (PEM)."
    )
    client_private_key_file: Str = Field(
        "", description="soupflow extension: its private key (PEM)."
    )
    client_private_key_password: Str = Field(
        "", description="soupflow extension: the key's password; use `${env:NAME}`."
    )


# ------------------------------------------------------------------------------ receiver
def parse_allow_list(allow_list: str) -> frozenset[str] | None:
    """`AcceptedCallingAETs` as upper-case titles; None when `*` lets anyone in."""
    titles = {token.strip().upper() for token in allow_list.split(",")}
    titles.discard("")
    return None if "*" in titles else frozenset(titles)


class ReceiverSetting(Setting, ListenerTlsFields):
    """What every receiver kind has: its `Id` is the workflow's identity."""

    KIND: ClassVar[str] = "receiver"
    schema_: Str | None = Field(None, alias="$schema", description="JSON Schema for editors.")
    workflow_pattern_name: Str = Field("", description="The workflow's display name.")
    disabled: Bool = Field(False, description="A disabled receiver starts no listener.")
    port: Int = Field(
        104,
        ge=0,
        le=65535,
        description="TCP port of the listener; one workflow per port across the folder "
        "(both receiver kinds); 0 = a free port chosen at start (shown by `status`).",
    )
    message_type: MessageTypeField = Field(
        MessageType.JSON, description="Kept for compatibility; ingestion builds a DICOM message."
    )
    message_type_options: DicomMessageTypeOptions | None = Field(
        None, description="Which nodes the DICOM message carries; absent = all of them."
    )
    filters: Reference = Field(None, description="FilterHostSetting run first; false = filtered.")
    variable_transformers: Reference = Field(
        None, description="TransformerSetting run after the filters, before any activity."
    )
    transformers: Reference = Field(
        None, description="Accepted; a DICOM receiver sends no response, so it has no effect."
    )
    activities: list[Reference] = Field([], description="Sender ids, in execution order.")
    deduplicate_window_seconds: Int = Field(
        0,
        ge=0,
        description="soupflow extension: drop a resent SOPInstanceUID within this "
        "window; 0 = off (a resend is processed again).",
    )

    @property
    def mutual_tls(self) -> bool:
        """Whether a client certificate is required (each kind's `AuthenticationType`)."""
        return False

    def identity(self) -> tuple[str, str]:
        """(what it answers as, who may call) for the listener table."""
        return "", ""


class DicomReceiverSetting(ReceiverSetting):
    """The workflow's DICOM C-STORE listener; its `Id` is the workflow's identity."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Receivers.DicomReceiverSetting"
    type_: Str = _type_field(TYPE_NAME)
    our_aet: Str = Field("HL7SOUP_SCP", description="Our AE title (1-16 characters).")
    accepted_calling_aets: Str = Field(
        "*",
        description="Comma-separated calling AE titles allowed to associate; `*` accepts "
        "anyone; tokens are trimmed and compared case-insensitively; empty rejects everyone.",
    )
    association_timeout_seconds: Int = Field(
        30, ge=1, description="Association negotiation and idle network timeout."
    )
    enforce_our_aet: Bool = Field(
        False, description="soupflow extension: reject associations whose called AE is not OurAET."
    )
    max_associations: Int = Field(
        10, ge=1, description="soupflow extension: concurrent associations accepted."
    )
    max_pdu_size: Int = Field(
        0, ge=0, description="soupflow extension: maximum PDU size we receive; 0 = unlimited."
    )
    authentication_type: Annotated[
        ListenerAuthentication,
        EnumNumberOrName("soupflow extension: 0 none, 2 client certificate required"),
    ] = ListenerAuthentication.none

    @property
    def mutual_tls(self) -> bool:
        return self.authentication_type == ListenerAuthentication.Certificate

    def identity(self) -> tuple[str, str]:
        allowed = parse_allow_list(self.accepted_calling_aets)
        if allowed is None:
            return self.our_aet, "anyone"
        return self.our_aet, ", ".join(sorted(allowed)) if allowed else "nobody (empty allow-list)"


class StowRsReceiverSetting(ReceiverSetting):
    """soupflow receiver: DICOMweb STOW-RS (`POST /{ServiceName}/studies[/{study}]`), each
    instance committed through the same ingest as a C-STORE before the answer."""

    TYPE_NAME: ClassVar[str] = "Soupflow.Receivers.StowRsReceiverSetting"
    type_: Str = _type_field(TYPE_NAME)
    port: Int = Field(
        8080,
        ge=0,
        le=65535,
        description="TCP port of the HTTP listener; one workflow per port across the folder "
        "(both receiver kinds); 0 = a free port chosen at start (shown by `status`).",
    )
    service_name: Str = Field(
        "dicom-web", description="The path prefix: POST /{ServiceName}/studies[/{study}]."
    )
    authentication_type: Annotated[
        StowAuthentication,
        EnumNumberOrName("0 none, 1 Basic, 2 client certificate, 3 bearer token"),
    ] = StowAuthentication.none
    user_name: Str = Field("", description="Basic user name (AuthenticationType 1).")
    password: Str = Field("", description="Basic password; use `${env:NAME}`.")
    bearer_token: Str = Field("", description="The token (AuthenticationType 3); `${env:NAME}`.")
    header_parameters: dict[str, Str] = Field(
        {},
        description='Request header -> variable name, e.g. {"X-Dicomly-Cert-Id": '
        '"SenderCertId"}; the headers also go into the Association node.',
    )
    deduplicate_header: Str = Field(
        "",
        description="A header naming the delivery (e.g. X-Dicomly-Request-Id): a replay of "
        "the same instance with the same bytes is answered as stored and not queued again; "
        "other bytes under the same key fail that instance (0x0110).",
    )
    max_request_bytes: Int = Field(
        4 * 2**30, ge=0, description="The largest body accepted (413 beyond); 0 = no limit."
    )
    max_concurrent_requests: Int = Field(
        16, ge=1, description="Requests served at once; the next hears 503 with Retry-After."
    )
    request_timeout_seconds: Int = Field(
        60,
        ge=1,
        description="The longest silence while reading a request; past it the connection "
        "is closed (never 408).",
    )

    @property
    def mutual_tls(self) -> bool:
        return self.authentication_type == StowAuthentication.Certificate

    def identity(self) -> tuple[str, str]:
        who = {
            StowAuthentication.none: "anyone",
            StowAuthentication.Basic: "Basic credentials",
            StowAuthentication.Certificate: "client certificates",
            StowAuthentication.Bearer: "a bearer token",
        }[self.authentication_type]
        return f"STOW-RS /{self.service_name.strip()}", who


# ------------------------------------------------------------------------------- senders
class HeaderSetting(FormatModel):
    name: Str = Field(description="Header name.")
    value: Str = Field("", description="Header value, with `${}` variables.")


class SenderSetting(Setting):
    """Common fields of every activity."""

    KIND: ClassVar[str] = "sender"
    # Fields whose text is expanded with `${}` variables when the activity runs.
    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = ("message_template",)
    # False for the kinds that send the received object, not their activity message.
    SENDS_ITS_MESSAGE: ClassVar[bool] = True
    disabled: Bool = Field(False, description="A disabled activity is skipped.")
    filters: Reference = Field(
        None, description="FilterHostSetting; false skips only this activity."
    )
    transformers: Reference = Field(
        None, description="TransformerSetting run just before it executes."
    )
    message_type: MessageTypeField = Field(
        MessageType.HL7V2, description="The outbound message's type."
    )
    message_template: Str = Field("", description="The outbound message, with `${}` expansion.")
    message_type_options: dict[str, Any] | None = Field(
        None, description="Options of the outbound message type (kept, not interpreted)."
    )
    retry_max_attempts: Int = Field(
        10, ge=1, description="soupflow extension: attempts before the message is dead."
    )
    retry_initial_seconds: Int = Field(
        2, ge=0, description="soupflow extension: first backoff delay (doubles, with jitter)."
    )
    retry_max_seconds: Int = Field(600, ge=0, description="soupflow extension: backoff cap.")


class FileWriterSenderSetting(SenderSetting):
    """Write the message to a file: text appends a record, Binary overwrites, DICOM writes the object."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Senders.FileWriterSenderSetting"
    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = (
        "message_template",
        "file_path_to_write",
        "directory_to_move_into",
    )
    type_: Str = _type_field(TYPE_NAME)
    file_path_to_write: Str = Field(
        "",
        description="File path, with `${}`; the resolved path must stay inside the folder named here.",
    )
    move_into_directory_on_complete: Bool = Field(
        False, description="Move a full file (MaxRecordsPerFile) into DirectoryToMoveInto."
    )
    directory_to_move_into: Str = Field("", description="Where full files are moved.")
    max_records_per_file: Int = Field(5000, ge=1, description="Records before the file rotates.")


class HttpSenderSetting(SenderSetting, ClientTlsFields):
    """One HTTP request per message."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Senders.HttpSenderSetting"
    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = (
        "message_template",
        "server",
        "user_name",
        "password",
        "token_url",
        "scope",
    )
    type_: Str = _type_field(TYPE_NAME)
    server: Str = Field(description="The URL requested (http:// or https://), with `${}`.")
    method: Annotated[HttpMethod, EnumNumberOrName("HTTP method")] = HttpMethod.POST
    content_type: Str = Field("text/plain", description="Content-Type of the body.")
    encoding: Str = Field("utf-8", description="Character encoding of the body.")
    timeout_seconds: Int = Field(30, ge=1, description="Request timeout.")
    headers: list[HeaderSetting] = Field([], description="Extra headers.")
    wait_for_response: Bool = Field(True, description="Keep the response as the inbound message.")
    authentication_mode: Annotated[HttpAuthentication, EnumNumberOrName("Authentication")] = (
        HttpAuthentication.none
    )
    user_name: Str = Field(
        "", description="Basic user, or OAuth2 client id; `${env:NAME}` allowed."
    )
    password: Str = Field(
        "", description="Basic password, or OAuth2 client secret; use `${env:NAME}`."
    )
    token_url: Str = Field("", description="soupflow extension: OAuth2 token endpoint.")
    scope: Str = Field("", description="soupflow extension: OAuth2 scope.")


class DicomSenderSetting(SenderSetting, ClientTlsFields):
    """C-STORE of the received object to a remote SCP."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Senders.DicomSenderSetting"
    SENDS_ITS_MESSAGE: ClassVar[bool] = False
    type_: Str = _type_field(TYPE_NAME)
    message_type: MessageTypeField = Field(MessageType.DICOM, description="16 DICOM.")
    remote_host: Str = Field("127.0.0.1", description="Host of the remote SCP.")
    remote_port: Int = Field(104, ge=1, le=65535, description="Port of the remote SCP.")
    our_aet: Str = Field("HL7SOUP_SCU", description="Calling AE title.")
    remote_aet: Str = Field("ANY_SCP", description="Called AE title.")
    timeout_seconds: Int = Field(
        30, ge=1, description="Deadline of each step: associate, one C-STORE, release."
    )
    keep_association_open_seconds: Int = Field(
        15,
        ge=0,
        description="soupflow extension: keep an association open this long after its last "
        "message and reuse it for the next ones to the same destination; 0 = one association "
        "per message.",
    )
    max_associations: Int = Field(
        1,
        ge=1,
        le=64,
        description="soupflow extension: associations open to this destination at once; "
        "workers beyond it wait for one (many PACS serve one association per caller at a "
        "time: raise it only for one that takes parallel associations).",
    )
    use_ssl: Bool = Field(False, description="soupflow extension: DICOM over TLS.")
    tls_server_name: Str = Field(
        "",
        description="soupflow extension: the name the certificate must hold; default RemoteHost.",
    )


FrameCharacter = Annotated[Str | Int, Field(description="A character, or its code.")]


class MLLPSenderSetting(SenderSetting, ClientTlsFields):
    """Send an HL7 v2 message over MLLP."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Senders.MLLPSenderSetting"
    type_: Str = _type_field(TYPE_NAME)
    server: Str = Field("127.0.0.1", description="Host of the MLLP listener.")
    port: Int = Field(22222, ge=1, le=65535, description="Port of the MLLP listener.")
    frame_start: list[FrameCharacter] = Field(["\u000b"], description="Frame start characters.")
    frame_end: list[FrameCharacter] = Field(["\u001c", "\r"], description="Frame end characters.")
    timeout_seconds: Int = Field(5, ge=1, description="Connect and ACK timeout.")
    wait_for_response: Bool = Field(True, description="Read the ACK; AE/AR is an error.")
    use_response: Bool = Field(
        False, description="With WaitForResponse: an empty reply is an error."
    )
    encoding: Str = Field("utf-8", description="Character encoding of the message.")
    keep_connection_open: Bool = Field(
        False,
        description="Reuse one connection across messages (closed after 60 s without one).",
    )
    use_ssl: Bool = Field(
        False, description="TLS: the chain and the name `Server` are always verified."
    )
    authentication_type: Annotated[
        MllpAuthentication,
        EnumNumberOrName("Client authentication; soupflow sends a client certificate when set"),
    ] = MllpAuthentication.none
    authentication_certificate_thumbprint: Str = Field("", description="Not used by soupflow.")


class CodeSenderSetting(SenderSetting, CodeFields):
    """Run code as an activity; soupflow runs `PythonCallable`."""

    TYPE_NAME: ClassVar[str] = "HL7Soup.Functions.Settings.Senders.CodeSenderSetting"
    type_: Str = _type_field(TYPE_NAME)


class StowRsSenderSetting(SenderSetting, ClientTlsFields):
    """soupflow sender: DICOMweb STOW-RS of the received object."""

    TYPE_NAME: ClassVar[str] = "Soupflow.Senders.StowRsSenderSetting"
    SENDS_ITS_MESSAGE: ClassVar[bool] = False
    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = (
        "message_template",
        "base_url",
        "user_name",
        "password",
        "bearer_token",
    )
    type_: Str = _type_field(TYPE_NAME)
    message_type: MessageTypeField = Field(MessageType.DICOM, description="16 DICOM.")
    base_url: Str = Field(
        description="DICOMweb base URL; instances are POSTed to {BaseUrl}/studies."
    )
    authentication_mode: Annotated[BearerAuthentication, EnumNumberOrName("Authentication")] = (
        BearerAuthentication.none
    )
    user_name: Str = Field("", description="Basic user; `${env:NAME}` allowed.")
    password: Str = Field("", description="Basic password; use `${env:NAME}`.")
    bearer_token: Str = Field("", description="Bearer token; use `${env:NAME}`.")
    headers: list[HeaderSetting] = Field([], description="Extra headers, with `${}` variables.")
    timeout_seconds: Int = Field(30, ge=1, description="Request timeout.")


RECEIVER_CLASSES: tuple[type[ReceiverSetting], ...] = (
    DicomReceiverSetting,
    StowRsReceiverSetting,
)
SETTING_CLASSES: tuple[type[Setting], ...] = (
    *RECEIVER_CLASSES,
    FilterHostSetting,
    TransformerSetting,
    FileWriterSenderSetting,
    HttpSenderSetting,
    DicomSenderSetting,
    MLLPSenderSetting,
    CodeSenderSetting,
    StowRsSenderSetting,
)

AnySetting = Annotated[
    Annotated[DicomReceiverSetting, Tag("DicomReceiverSetting")]
    | Annotated[StowRsReceiverSetting, Tag("StowRsReceiverSetting")]
    | Annotated[FilterHostSetting, Tag("FilterHostSetting")]
    | Annotated[TransformerSetting, Tag("TransformerSetting")]
    | Annotated[FileWriterSenderSetting, Tag("FileWriterSenderSetting")]
    | Annotated[HttpSenderSetting, Tag("HttpSenderSetting")]
    | Annotated[DicomSenderSetting, Tag("DicomSenderSetting")]
    | Annotated[MLLPSenderSetting, Tag("MLLPSenderSetting")]
    | Annotated[CodeSenderSetting, Tag("CodeSenderSetting")]
    | Annotated[StowRsSenderSetting, Tag("StowRsSenderSetting")],
    _discriminator(SETTING_CLASSES),
    WithJsonSchema(polymorphic_schema(_members(SETTING_CLASSES))),
]


class WorkflowFile(FormatModel):
    """A workflow file: metadata and a flat list of settings that link to each other by Id."""

    schema_: Str | None = Field(None, alias="$schema", description="JSON Schema for editors.")
    name: Str | None = Field(
        "", description="Display name; should equal the receiver's WorkflowPatternName."
    )
    workflow_id: Reference = Field(
        None,
        description="The workflow's identity; should equal the receiver's Id; unique in a folder.",
    )
    comments: Str | None = Field(None, description="Free text; no runtime effect.")
    modified: Str | None = Field(None, description="Metadata; no runtime effect.")
    imported_date: Str | None = Field(None, description="Metadata; no runtime effect.")
    workflow_pattern: list[AnySetting] = Field(
        description="The settings: exactly one receiver, its activities, filters and transformers."
    )


def parse_document(document: Any) -> WorkflowFile | ReceiverSetting:
    """The model of a whole file: a bare receiver (has `$type`) or a workflow file.

    Raises pydantic.ValidationError (or TypeError for a non-object root).
    """
    if not isinstance(document, dict):
        raise TypeError("a workflow file is a JSON object")
    if "$type" in document:
        cls = pick_class(document, RECEIVER_CLASSES) or DicomReceiverSetting
        return typing.cast(ReceiverSetting, cls.model_validate(document))
    return WorkflowFile.model_validate(document)


@cache
def known_fields_in_order(model: type[BaseModel]) -> tuple[str, ...]:
    """The format names a model knows: its own fields first, then inherited ones, nearest first.

    So an action lists `VariableName` before the source and formatting fields it shares.
    """
    order: dict[str, None] = {}
    for cls in model.__mro__:
        for attribute in getattr(cls, "__annotations__", {}):
            info = model.model_fields.get(attribute)
            if info is not None:
                order[info.alias or attribute] = None
    return tuple(order)


def known_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(known_fields_in_order(model))


def root_classes(document: dict[str, Any]) -> tuple[type[FormatModel], ...]:
    """The model of a file's root object: a bare receiver when it has `$type`."""
    return RECEIVER_CLASSES if "$type" in document else (WorkflowFile,)


def pick_class(
    value: dict[str, Any], classes: tuple[type[FormatModel], ...]
) -> type[FormatModel] | None:
    """Which of `classes` a raw JSON object is (by its `$type` when there is a choice)."""
    if len(classes) == 1:
        return classes[0]
    type_value = value.get("$type")
    if not isinstance(type_value, str):
        return None
    for cls in classes:
        if re.search(type_pattern(getattr(cls, "TYPE_NAME", "")), type_value):
            return cls
    return None


def _model_classes(annotation: Any) -> tuple[type[FormatModel], ...]:
    """The format models an annotation can hold (through lists, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, FormatModel):
        return (annotation,)
    found: list[type[FormatModel]] = []
    if typing.get_origin(annotation) is not None or isinstance(annotation, types.UnionType):
        for argument in typing.get_args(annotation):
            found.extend(_model_classes(argument))
    return tuple(dict.fromkeys(found))


@cache
def nested_fields(cls: type[FormatModel]) -> dict[str, tuple[type[FormatModel], ...]]:
    """Format name -> the models its value holds, for fields that hold models."""
    nested = {}
    for name, info in cls.model_fields.items():
        classes = _model_classes(info.annotation)
        if classes:
            nested[info.alias or name] = classes
    return nested
