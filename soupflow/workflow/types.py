"""Field types of the workflow format: strict JSON scalars, GUIDs, enums. Upstream: model. Pure.

Strictness matches JSON Schema so that the model and the generated schema accept the same
documents: an integer field takes a JSON integer (or a number with no fraction, as JSON
Schema's `integer` does) but never a string or a boolean; a string field takes only a string.
Patterns run on Python's `re` engine in both the model and `jsonschema`, so they agree.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, Strict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

GUID_PATTERN = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
REFERENCE_PATTERN = (
    r"^([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})?$"
)
ZERO_GUID = "00000000-0000-0000-0000-000000000000"


def _integral_number(value: object) -> object:
    """JSON Schema's `integer` accepts 104.0; so does the model (as 104)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral_number), Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Guid = Annotated[str, Strict(), Field(pattern=GUID_PATTERN)]
# A link to another setting: a GUID, or all-zero / "" / null for "nothing linked".
Reference = Annotated[str, Strict(), Field(pattern=REFERENCE_PATTERN)] | None


def normalize_reference(value: str | None) -> str | None:
    """The linked setting's id in canonical form, or None when nothing is linked."""
    if value is None:
        return None
    value = value.strip().lower()
    return None if value in ("", ZERO_GUID) else value


@dataclass(frozen=True)
class EnumNumberOrName:
    """Marks an enum field that takes the number (as the format writes it) or the member's name.

    Use as `Annotated[StringComparer, EnumNumberOrName("The comparison")]`.
    """

    description: str

    def __get_pydantic_core_schema__(
        self, source: type[enum.IntEnum], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        by_name = {member.name: member for member in source}

        def coerce(value: object) -> object:
            value = _integral_number(value)
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    return source(value)
                except ValueError:
                    return value
            if isinstance(value, str) and value in by_name:
                return by_name[value]
            return value

        return core_schema.no_info_before_validator_function(
            coerce, core_schema.is_instance_schema(source)
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        members = list(schema["schema"]["cls"])
        names = ", ".join(f"{member.value} {member.name}" for member in members)
        return {
            "enum": [member.value for member in members] + [member.name for member in members],
            "description": f"{self.description} ({names}; the number or the name)",
        }


class MessageType(enum.IntEnum):
    """The type of an activity's message (the format's `MessageTypes`)."""

    Unknown = 0
    HL7V2 = 1
    XML = 4
    CSV = 5
    SQL = 6
    JSON = 11
    Text = 13
    Binary = 14
    DICOM = 16


class PathType(enum.IntEnum):
    """How `FromPath`/`ToPath`/`Path` is read. Real files use two numbering families."""

    HL7V2 = 1
    XML = 4
    CSV = 5
    TextWithVariables = 7
    HL7V2Path = 8
    XPath = 9
    CSVPath = 10
    JSON = 11
    JSONPath = 12
    DICOM = 16


HL7_PATH_TYPES = frozenset({PathType.HL7V2, PathType.HL7V2Path})
JSON_PATH_TYPES = frozenset({PathType.JSON, PathType.JSONPath, PathType.DICOM})
XML_PATH_TYPES = frozenset({PathType.XML, PathType.XPath})
CSV_PATH_TYPES = frozenset({PathType.CSV, PathType.CSVPath})


class Direction(enum.IntEnum):
    """Which side of the activity named by `FromSetting` is read."""

    Inbound = 0
    Outbound = 1
    Variable = 2


class Conjunction(enum.IntEnum):
    """How a filter item joins the next one."""

    And = 0
    Or = 1


class StringComparer(enum.IntEnum):
    Equals = 0
    Contains = 1
    StartsWith = 2
    EndsWith = 3
    LengthGreaterThan = 4
    LengthLessThan = 5
    Empty = 6
    InMessage = 7
    InDataTable = 8
    IsTitleCase = 9
    IsUpperCase = 10
    IsLowerCase = 11
    InList = 12


class DateComparer(enum.IntEnum):
    Equals = 0
    GreaterThan = 1
    LessThan = 2
    GreaterThanOrEqualTo = 3
    LessThanOrEqualTo = 4
    Empty = 5
    InMessage = 6
    InvalidDate = 7


class ValidComparer(enum.IntEnum):
    Valid = 0
    Invalid = 1


class HttpMethod(enum.IntEnum):
    POST = 0
    GET = 1
    PUT = 2
    DELETE = 3


class HttpAuthentication(enum.IntEnum):
    none = 0
    Basic = 1
    OAuth2ClientCredentials = 2


class BearerAuthentication(enum.IntEnum):
    none = 0
    Basic = 1
    Bearer = 2


class MllpAuthentication(enum.IntEnum):
    none = 0
    Basic = 1
    Certificate = 2


class ListenerAuthentication(enum.IntEnum):
    none = 0
    Certificate = 2


class StowAuthentication(enum.IntEnum):
    none = 0
    Basic = 1
    Certificate = 2
    Bearer = 3


class TextFormat(enum.IntEnum):
    none = 0
    UpperCase = 1
    LowerCase = 2
    TitleCase = 3


class Truncation(enum.IntEnum):
    none = 0
    TruncateEnd = 1
    TruncateStart = 2


class ValueEncoding(enum.IntEnum):
    none = 0
    HL7Encode = 1
    JSONEncode = 2
    XMLEncode = 3
    Base64Encode = 4
    HL7Decode = 5
    JSONDecode = 6
    XMLDecode = 7
    Base64Decode = 8


def type_pattern(type_name: str) -> str:
    """`$type` is `Namespace.Class, Assembly`: match the class, any assembly."""
    return "^" + re.escape(type_name) + "(,.*)?$"


def polymorphic_schema(members: list[tuple[str, str]]) -> dict[str, Any]:
    """`if $type is X then <schema of X>` branches, so errors name the right branch.

    A plain `oneOf` makes a validator report "is not valid under any of the given schemas";
    with one `if`/`then` per `$type`, a missing `Server` on an HTTP sender is reported as
    exactly that. `members` holds (type name, $defs name) pairs.
    """
    any_known = "^(" + "|".join(re.escape(name) for name, _ in members) + ")(,.*)?$"
    return {
        "type": "object",
        "required": ["$type"],
        "properties": {"$type": {"type": "string", "pattern": any_known}},
        "allOf": [
            {
                "if": {
                    "required": ["$type"],
                    "properties": {"$type": {"type": "string", "pattern": type_pattern(name)}},
                },
                "then": {"$ref": f"#/$defs/{definition}"},
            }
            for name, definition in members
        ],
    }
