"""The pure parsers of paths and `${}` templates."""

from __future__ import annotations

import pytest

from soupflow.workflow import paths, template


def test_slash_paths_have_one_based_indexes_and_default_to_the_first_item() -> None:
    parsed = paths.parse_json_path("Tags/ReferencedSeriesSequence[2]/SeriesInstanceUID")
    assert parsed == paths.SlashPath(
        (
            paths.JsonStep("Tags", None),
            paths.JsonStep("ReferencedSeriesSequence", 2),
            paths.JsonStep("SeriesInstanceUID", None),
        )
    )
    assert paths.parse_json_path("") == paths.SlashPath(())


def test_jmespath_paths_compile() -> None:
    parsed = paths.parse_json_path("jmespath:Tags.ReferencedSeriesSequence[0].SeriesInstanceUID")
    assert isinstance(parsed, paths.JmesPath)
    assert (
        parsed.expression.search(
            {"Tags": {"ReferencedSeriesSequence": [{"SeriesInstanceUID": "1.2"}]}}
        )
        == "1.2"
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("PID-5.1", paths.Hl7Path("PID", 1, 5, 1, 1, None)),
        ("OBX[2]-5", paths.Hl7Path("OBX", 2, 5, 1, None, None)),
        ("PID-3[2].4.1", paths.Hl7Path("PID", 1, 3, 2, 4, 1)),
        ("MSH", paths.Hl7Path("MSH", 1, None, 1, None, None)),
    ],
)
def test_hl7_paths(path: str, expected: paths.Hl7Path) -> None:
    assert paths.parse_hl7_path(path) == expected


@pytest.mark.parametrize("path", ["PID-0", "pid-5", "PID-5.1.2.3", "PID5"])
def test_bad_hl7_paths(path: str) -> None:
    with pytest.raises(paths.PathError):
        paths.parse_hl7_path(path)


def test_templates_split_into_text_and_variables() -> None:
    guid = "5D0C7A4E-1F2B-4C39-9A57-0B6E3C2D1001"
    parts = template.parse_template(
        f"a ${{Name}} ${{CurrentDateTime:HH:mm}} ${{env:TOKEN}} ${{{guid} Inbound}} $ {{x}}"
    )
    assert parts == (
        template.Text("a "),
        template.Variable("Name", "", 2),
        template.Text(" "),
        template.Variable("CurrentDateTime", "HH:mm", 10),
        template.Text(" "),
        template.EnvironmentVariable("TOKEN", 35),
        template.Text(" "),
        template.ActivityMessage(guid.lower(), "inbound", 48),
        template.Text(" $ {x}"),
    )


@pytest.mark.parametrize(
    ("text", "offset", "message"),
    [
        ("x ${a", 2, "never closed"),
        ("${a${b}}", 3, "do not nest"),
        ("${}", 0, "names no variable"),
        ("${env:1X}", 0, "environment variable"),
    ],
)
def test_templates_that_do_not_parse(text: str, offset: int, message: str) -> None:
    with pytest.raises(template.TemplateError) as error:
        template.parse_template(text)
    assert error.value.offset == offset
    assert message in error.value.message
