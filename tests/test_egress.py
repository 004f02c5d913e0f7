"""Fail-closed egress (`--allowed-tcp`, `--allowed-http`) and the cleartext-listener refusal:
the operator's lists, checked at load with file, line and pointer, and again at send time
after `${}` expansion, connecting to the address that was checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from soupflow.activities.connections import Connections
from soupflow.activities.egress import checked_client
from soupflow.cli import main
from soupflow.message.convert import Options, convert
from soupflow.network import Allowlist, CleartextPorts, Egress, EgressError
from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import PermanentError
from soupflow.pipeline.run import Ending, Result, run_message
from soupflow.runtime.listeners_file import ListenerState
from soupflow.runtime.supervisor import Runtime
from soupflow.workflow.load import load_text
from tests import documents
from tests.dicom import RuntimeProcess, sample_file, soupflow
from tests.documents import NS_SENDERS, VARIABLES_ID, action, transformer, type_of
from tests.http_peer import HttpPeer
from tests.test_pipeline import arrival

SENDER_ID = "99999999-0000-4000-8000-0000000000e1"


def tcp(*entries: str) -> Allowlist:
    return Allowlist.parse(entries, "--allowed-tcp")


@pytest.mark.parametrize(
    ("entries", "host", "port", "allowed"),
    [
        ((), "127.0.0.1", 104, True),  # loopback always
        ((), "::1", 104, True),
        ((), "localhost", 104, True),
        ((), "10.1.2.3", 104, False),  # nothing else without the operator
        (("10.1.2.3",), "10.1.2.3", 11112, True),
        (("10.1.2.3:104",), "10.1.2.3", 11112, False),
        (("10.0.0.0/8",), "10.200.0.9", 104, True),
        (("10.0.0.0/8:104",), "10.200.0.9", 105, False),
        (("pacs.example.org:104",), "PACS.example.org", 104, True),
        (("pacs.example.org",), "archive.example.org", 104, False),
        (("[fd00::5]:104",), "fd00::5", 104, True),
        (("[fd00::5]:104",), "fd00::6", 104, False),
        (("fd00::/8",), "fd12::1", 4242, True),
        (("[fd00::/8]:104",), "fd12::1", 4242, False),
        (("[fd00::/8]:104",), "fd12::1", 104, True),
    ],
)
def test_allowlist_entries(entries: tuple[str, ...], host: str, port: int, allowed: bool) -> None:
    assert tcp(*entries).allowed_without_lookup(host, port) is allowed


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "host:notaport", "[fd00::1", "*", "a b"])
def test_a_malformed_entry_is_refused_naming_the_option(entry: str) -> None:
    with pytest.raises(ValueError, match="--allowed-tcp"):
        tcp(entry)


def test_a_name_resolves_once_to_a_checked_address() -> None:
    assert tcp().address("localhost", 104) in ("127.0.0.1", "::1")
    assert tcp("10.0.0.0/8").address("10.9.8.7", 104) == "10.9.8.7"
    with pytest.raises(EgressError, match=r"^192\.0\.2\.7:104 is not allowed by --allowed-tcp"):
        tcp("10.0.0.0/8").address("192.0.2.7", 104)
    with pytest.raises(EgressError, match="does not resolve"):
        tcp("10.0.0.0/8").address("pacs.invalid", 104)


def dicom_sender(host: str, port: int = 104) -> dict[str, Any]:
    return {
        "$type": type_of("DicomSenderSetting", NS_SENDERS),
        "Id": SENDER_ID,
        "Name": "PACS",
        "RemoteHost": host,
        "RemotePort": port,
        "RemoteAET": "PACS",
        "MessageTemplate": "",
    }


def validate(capsys: Any, path: Path, *options: str) -> tuple[int, str]:
    status = main(["validate", str(path), *options])
    return status, capsys.readouterr().out


@pytest.mark.parametrize(
    ("host", "options", "allowed"),
    [
        ("192.0.2.10", ["--allowed-tcp", "10.0.0.0/8:104"], False),
        ("10.1.2.3", ["--allowed-tcp", "10.0.0.0/8:104"], True),
        ("fd00::5", ["--allowed-tcp", "[fd00::5]:104"], True),
        ("fd00::6", ["--allowed-tcp", "[fd00::5]:104,10.0.0.0/8"], False),
    ],
)
def test_validate_checks_destinations_against_the_operators_lists(
    tmp_path: Path, capsys: Any, host: str, options: list[str], allowed: bool
) -> None:
    path = tmp_path / "forward.json"
    text = documents.write(path, documents.workflow(dicom_sender(host), Port=0))
    status, output = validate(capsys, path, *options)
    if allowed:
        assert status == 0, output
        return
    line, column = documents.position_of(text, f'"{host}"')
    assert status == 1
    assert output.startswith(
        f"{path}:{line}:{column}: /WorkflowPattern/1/RemoteHost: error: {host}:104 is not an "
        "allowed destination (--allowed-tcp: "
    )


def test_validate_without_the_operators_lists_checks_the_format_only(
    tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "forward.json"
    documents.write(path, documents.workflow(dicom_sender("192.0.2.10"), Port=0))
    assert validate(capsys, path)[0] == 0


def test_the_runtime_refuses_a_destination_not_allowed_at_start_and_reload(
    tmp_path: Path,
) -> None:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir()
    path = workflows / "forward.json"
    documents.write(path, documents.workflow(dicom_sender("192.0.2.10"), Port=0))
    runtime = RuntimeProcess(workflows, data, "--allowed-tcp", "198.51.100.0/24")
    try:
        [row] = runtime.refresh()
        assert row["state"] == ListenerState.INVALID
        assert "192.0.2.10:104 is not an allowed destination" in runtime.log_text()
        documents.write(path, documents.workflow(dicom_sender("198.51.100.20"), Port=0))
        runtime.refresh(lambda rows: rows[0]["state"] == ListenerState.LISTENING)
        shown = soupflow("status", "--data", str(data)).stdout
        assert (
            "--allowed-tcp: 198.51.100.0/24" in shown and "--allowed-http: loopback only" in shown
        )
    finally:
        assert runtime.terminate() == 0


def _run_http(document: dict[str, Any], tmp_path: Path, egress: Egress) -> Result:
    loaded = load_text(json.dumps(document), Path("w.json"))
    assert loaded.valid, [str(issue) for issue in loaded.issues]
    path = sample_file("CT_small.dcm")
    facts = arrival(path)
    context = RunContext(loaded, convert(path, facts, Options()), facts, path, tmp_path)
    with checked_client(egress.http) as client:
        return run_message(
            context, frozenset(), lambda *_: None, client, Connections(egress=egress)
        )


def _templated(target: str) -> dict[str, Any]:
    sender = documents.http_sender(Server="http://${Target}/hook")
    variables = transformer(
        VARIABLES_ID,
        action(
            "CreateVariable", VariableName="Target", FromPath=target, FromDirection=2, FromType=7
        ),
    )
    return documents.workflow(sender, variables, VariableTransformers=VARIABLES_ID)


def test_a_templated_destination_is_checked_after_expansion_at_send_time(
    tmp_path: Path,
) -> None:
    egress = Egress(http=Allowlist.parse(["198.51.100.0/24"], "--allowed-http", urls=True))
    refused = _run_http(_templated("192.0.2.1:8080"), tmp_path, egress)
    assert refused.state == Ending.FAILED and isinstance(refused.error, PermanentError)
    assert str(refused.error).startswith("192.0.2.1:8080 is not allowed by --allowed-http")
    peer = HttpPeer()
    try:
        port = peer.server.server_address[1]
        allowed = _run_http(_templated(f"localhost:{port}"), tmp_path, egress)
    finally:
        peer.close()
    assert allowed.state == Ending.COMPLETED
    [request] = peer.requests
    assert request.headers["Host"] == f"localhost:{port}"  # the name, sent to the address


def test_redirects_are_not_followed(tmp_path: Path) -> None:
    peer = HttpPeer(statuses=[302])
    try:
        result = _run_http(
            documents.workflow(documents.http_sender(Server=peer.url)), tmp_path, Egress()
        )
    finally:
        peer.close()
    assert isinstance(result.error, PermanentError) and "HTTP 302" in str(result.error)
    assert len(peer.requests) == 1


def test_a_url_prefix_entry_allows_only_under_it() -> None:
    http = Allowlist.parse(["https://pacs.example.org/dicom-web/"], "--allowed-http", urls=True)
    assert http.allows_url("https://PACS.example.org/dicom-web/studies")
    assert not http.allows_url("https://pacs.example.org/other/")
    assert not http.allows_url("http://pacs.example.org/dicom-web/")
    with (
        checked_client(http) as client,
        pytest.raises(EgressError, match=r"192\.0\.2\.9:443 is not allowed"),
    ):
        client.get("https://192.0.2.9/dicom-web/", timeout=httpx.Timeout(5))


# ------------------------------------------------------------------------ cleartext
def _cleartext_runtime(tmp_path: Path, allow: str) -> Runtime:
    workflows = tmp_path / "workflows"
    workflows.mkdir(exist_ok=True)
    documents.write(workflows / "intake.json", documents.workflow(Port=0))
    return Runtime(
        workflows,
        tmp_path / "data",
        "0.0.0.0",
        workers=0,
        allow_cleartext=CleartextPorts.parse(allow),
    )


def test_a_cleartext_listener_off_loopback_is_refused_unless_the_operator_allows_it(
    tmp_path: Path,
) -> None:
    runtime = _cleartext_runtime(tmp_path, "")
    runtime.start()
    try:
        [row] = runtime.rows
        assert row.state == ListenerState.REFUSED
        assert "cleartext on 0.0.0.0" in row.detail and "--allow-cleartext" in row.detail
    finally:
        runtime.stop()
    allowed = _cleartext_runtime(tmp_path, "*")
    allowed.start()
    try:
        assert [row.state for row in allowed.rows] == [ListenerState.LISTENING]
    finally:
        allowed.stop()


def test_allow_cleartext_takes_ports_or_a_star() -> None:
    assert CleartextPorts.parse("104, 11112").allows(11112)
    assert not CleartextPorts.parse("104").allows(11112)
    assert CleartextPorts.parse("*").allows(1)
    with pytest.raises(ValueError, match="port numbers or"):
        CleartextPorts.parse("all")
