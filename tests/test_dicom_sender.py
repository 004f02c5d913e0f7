"""Forwarding by C-STORE and Python code steps, with real peers on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.ingest import free_port
from soupflow.store.queue import FINAL_STATES, Message, State
from soupflow.store.sqlite import SqliteQueue
from tests import documents
from tests.dicom import (
    NODELAY,
    RuntimeProcess,
    dataset_bytes,
    require_tool,
    sample_file,
    send_files,
    soupflow,
    wait_for,
)
from tests.documents import (
    NS_SENDERS,
    RECEIVER_ID,
    VARIABLES_ID,
    action,
    file_writer,
    transformer,
    type_of,
)

SENDER_ID = "99999999-0000-4000-8000-000000000001"
JPEG = sample_file("SC_rgb_jpeg_dcmtk.dcm")


def forwarding(port: int, **fields: Any) -> dict[str, Any]:
    sender = {
        "$type": type_of("DicomSenderSetting", NS_SENDERS),
        "Id": SENDER_ID,
        "Name": "PACS",
        "RemoteHost": "127.0.0.1",
        "RemotePort": port,
        "RemoteAET": "PACS",
        "OurAET": "SOUPFLOW",
        "TimeoutSeconds": 10,
        "MessageTemplate": f"${{{RECEIVER_ID} inbound}}",
        **fields,
    }
    return documents.workflow(sender, Port=0, AcceptedCallingAETs="*")


def run_until_final(
    tmp_path: Path, document: dict[str, Any], files: list[Path], extra: dict[str, str] | None = None
) -> tuple[list[Message], RuntimeProcess]:
    workflows, data = tmp_path / "workflows", tmp_path / "data"
    workflows.mkdir(parents=True, exist_ok=True)
    for name, text in (extra or {}).items():
        (workflows / name).write_text(text, encoding="utf-8")
    documents.write(workflows / "forward.json", document)
    runtime = RuntimeProcess(workflows, data)
    try:
        assert send_files(runtime.port, files) == [0] * len(files)
        queue = SqliteQueue(data)
        try:
            messages = wait_for(
                lambda: (
                    m
                    if len(m := queue.messages()) == len(files)
                    and all(x.state in FINAL_STATES for x in m)
                    else None
                ),
                "every message to finish",
            )
        finally:
            queue.close()
    finally:
        assert runtime.terminate() == 0
    return messages, runtime


@contextmanager
def storescp(folder: Path, *options: str) -> Iterator[int]:
    program = require_tool("storescp")
    port = free_port()
    folder.mkdir()
    peer = subprocess.Popen(
        [program, *options, "-aet", "PACS", "-od", str(folder), str(port)], env=NODELAY
    )
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [require_tool("echoscu"), "-aec", "PACS", "127.0.0.1", str(port)],
                    env=NODELAY,
                    capture_output=True,
                    timeout=10,
                    check=False,
                ).returncode
                == 0
            ),
            "storescp to answer",
        )
        yield port
    finally:
        peer.terminate()
        peer.wait(timeout=30)


def test_forwarded_objects_arrive_byte_identical_in_their_own_transfer_syntax(
    tmp_path: Path,
) -> None:
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm"), JPEG]
    with storescp(tmp_path / "pacs", "+B", "+xa") as port:
        messages, _ = run_until_final(tmp_path, forwarding(port), files)
        received = {
            str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path
            for path in (tmp_path / "pacs").iterdir()
        }
    assert {m.state for m in messages} == {State.COMPLETED}
    for source in files:
        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(source)
        assert (
            dcmread(received[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID
            == dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )


def test_a_refused_compressed_syntax_falls_back_to_decompressed(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as port:  # uncompressed only
        [message], _ = run_until_final(tmp_path, forwarding(port), [JPEG])
        [received] = (tmp_path / "pacs").iterdir()
    assert message.state == State.COMPLETED
    assert "sent decompressed: the peer refused 1.2.840.10008.1.2.4.50" in outcome_details(
        tmp_path, message
    )
    stored = dcmread(received)
    assert stored.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    assert stored.SOPInstanceUID == dcmread(JPEG).SOPInstanceUID
    assert len(stored.PixelData) == stored.Rows * stored.Columns * stored.SamplesPerPixel


def test_a_refused_syntax_that_cannot_be_decoded_here_is_dead_with_the_reason(
    tmp_path: Path,
) -> None:
    jpeg_ls = sample_file("MR_small_jpeg_ls_lossless.dcm")
    with storescp(
        tmp_path / "pacs"
    ) as port:  # uncompressed only; no JPEG-LS decoder installed here
        [message], _ = run_until_final(tmp_path, forwarding(port), [jpeg_ls])
    assert (message.state, message.failed_activity) == (State.DEAD, SENDER_ID)
    reason = message.reason or ""
    assert (
        "refused SOP class 1.2.840.10008.5.1.4.1.1.4 in transfer syntax 1.2.840.10008.1.2.4.80"
        in reason
    )
    assert "decoding it here failed" in reason


def test_an_unreachable_peer_is_retried_then_dead(tmp_path: Path) -> None:
    [message], _ = run_until_final(
        tmp_path,
        forwarding(free_port(), RetryInitialSeconds=0, RetryMaxAttempts=2),
        [sample_file("CT_small.dcm")],
    )
    assert (message.state, message.attempts) == (State.DEAD, 2)
    assert "cannot connect to PACS" in (message.reason or "") and "gave up after 2 attempts" in (
        message.reason or ""
    )


@contextmanager
def scripted_scp(statuses: list[int]) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP answering C-STOREs with `statuses`, then Success."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return statuses.pop(0) if statuses else 0

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    for context in ("1.2.840.10008.5.1.4.1.1.2",):
        ae.add_supported_context(context, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def test_out_of_resources_is_retried_and_an_error_status_is_dead(tmp_path: Path) -> None:
    with scripted_scp([0xA700]) as (port, received):
        [message], _ = run_until_final(
            tmp_path / "a", forwarding(port, RetryInitialSeconds=0), [sample_file("CT_small.dcm")]
        )
    assert (message.state, message.attempts, len(received)) == (State.COMPLETED, 2, 2)
    with scripted_scp([0xC000]) as (port, received):
        [message], _ = run_until_final(
            tmp_path / "b", forwarding(port), [sample_file("CT_small.dcm")]
        )
    assert (message.state, message.attempts) == (State.DEAD, 1)
    assert "answered C-STORE 0xC000" in (message.reason or "")


def outcome_details(tmp_path: Path, message: Message) -> str:
    queue = SqliteQueue(tmp_path / "data")
    try:
        return " ".join(o.detail for o in queue.activity_outcomes(message.request_id))
    finally:
        queue.close()


def test_a_warning_status_succeeds_and_is_recorded_in_the_outcome(tmp_path: Path) -> None:
    with scripted_scp([0xB000]) as (port, _):
        [message], _ = run_until_final(tmp_path, forwarding(port), [sample_file("CT_small.dcm")])
    assert message.state == State.COMPLETED
    assert "C-STORE 0xB000 Warning: Coercion of Data Elements" in outcome_details(tmp_path, message)


def test_soupflow_echo_tests_a_connection(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as port:
        ok = subprocess.run(
            [
                sys.executable,
                "-m",
                "soupflow",
                "echo",
                "127.0.0.1",
                str(port),
                "--called-aet",
                "PACS",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert ok.returncode == 0 and "C-ECHO status 0x0000" in ok.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "soupflow", "echo", "127.0.0.1", str(free_port()), "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and "no association" in refused.stderr


STEPS = """
def tag(step):
    step.set_variable("Route", step.message["CommonFields"]["Modality"].lower() + "-" + step.variables.get("suffix", "x"))


def explode(step):
    raise ValueError("bad value for " + step.message["CommonFields"]["PatientName"])


def leave(step):
    import sys
    sys.exit(3)


def vanish(step):
    import os
    os._exit(7)


def spin(step):
    while True:
        pass
"""


def code_sender(callable_name: str) -> dict[str, Any]:
    return {
        "$type": type_of("CodeSenderSetting", NS_SENDERS),
        "Id": SENDER_ID,
        "Name": "Python",
        "PythonCallable": callable_name,
    }


def code_action(callable_name: str) -> dict[str, Any]:
    return action("Code", PythonCallable=callable_name)


def test_a_python_step_sets_a_variable_a_later_file_writer_uses(tmp_path: Path) -> None:
    document = documents.workflow(
        file_writer(FilePathToWrite="out/${Route}/${SOPInstanceUID}.dcm"),
        transformer(
            VARIABLES_ID,
            action(
                "CreateVariable", VariableName="Suffix", FromPath="z", FromDirection=2, FromType=7
            ),
            code_action("soupflow_test_steps:tag"),
        ),
        Port=0,
        AcceptedCallingAETs="*",
        VariableTransformers=VARIABLES_ID,
    )
    [message], _ = run_until_final(
        tmp_path, document, [sample_file("CT_small.dcm")], {"soupflow_test_steps.py": STEPS}
    )
    assert message.state == State.COMPLETED
    assert list((tmp_path / "data" / "out" / "ct-z").glob("*.dcm"))


def test_a_python_step_that_raises_is_dead_with_its_exception_type_and_no_phi_in_the_log(
    tmp_path: Path,
) -> None:
    exploding = code_sender("soupflow_test_steps:explode")
    [message], runtime = run_until_final(
        tmp_path,
        documents.workflow(exploding, Port=0, AcceptedCallingAETs="*"),
        [sample_file("CT_small.dcm")],
        {"soupflow_test_steps.py": STEPS},
    )
    assert message.state == State.DEAD
    reason = message.reason or ""
    assert reason.startswith("PythonCallable soupflow_test_steps:explode raised ValueError")
    assert "Traceback" in reason and "CompressedSamples^CT1" in reason  # the record keeps it...
    assert (
        "raised ValueError" in runtime.log_text() and "CompressedSamples" not in runtime.log_text()
    )  # ...the log does not


def test_a_python_step_that_exits_is_dead_and_the_workers_go_on(tmp_path: Path) -> None:
    exiting = code_sender("soupflow_test_steps:leave")
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    messages, _ = run_until_final(
        tmp_path,
        documents.workflow(exiting, Port=0, AcceptedCallingAETs="*"),
        files,
        {"soupflow_test_steps.py": STEPS},
    )
    assert [m.state for m in messages] == [State.DEAD, State.DEAD]  # both ran: no worker died
    assert all("raised SystemExit" in (m.reason or "") for m in messages)


def test_a_python_step_that_ends_its_process_is_dead_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    document = documents.workflow(
        code_sender("soupflow_test_steps:vanish"), Port=0, AcceptedCallingAETs="*"
    )
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    messages, _ = run_until_final(tmp_path, document, files, {"soupflow_test_steps.py": STEPS})
    assert [m.state for m in messages] == [State.DEAD, State.DEAD]  # a new process each time
    assert all("ended its process (exit code 7)" in (m.reason or "") for m in messages)


def test_a_python_step_that_loops_is_stopped_at_its_time_limit_and_the_workers_go_on(
    tmp_path: Path,
) -> None:
    spinning = code_sender("soupflow_test_steps:spin") | {"TimeoutSeconds": 1}
    document = documents.workflow(
        spinning,
        transformer(VARIABLES_ID, code_action("soupflow_test_steps:tag")),
        Port=0,
        AcceptedCallingAETs="*",
        VariableTransformers=VARIABLES_ID,
    )
    files = [sample_file("CT_small.dcm"), sample_file("MR_small.dcm")]
    messages, _ = run_until_final(tmp_path, document, files, {"soupflow_test_steps.py": STEPS})
    assert [m.state for m in messages] == [State.DEAD, State.DEAD]
    assert all(
        (m.reason or "").startswith(
            "PythonCallable soupflow_test_steps:spin ran past its TimeoutSeconds (1 s)"
        )
        for m in messages
    )


def test_dead_list_shows_the_one_line_reason_and_show_the_detail(tmp_path: Path) -> None:
    exploding = code_sender("soupflow_test_steps:explode")
    [message], _ = run_until_final(
        tmp_path,
        documents.workflow(exploding, Port=0, AcceptedCallingAETs="*"),
        [sample_file("CT_small.dcm")],
        {"soupflow_test_steps.py": STEPS},
    )
    data = str(tmp_path / "data")
    listed = soupflow("dead", "list", "--data", data).stdout  # exit status: the text checks it
    assert message.request_id in listed and "raised ValueError" in listed
    assert "CompressedSamples" not in listed and "Traceback" not in listed
    shown = soupflow("dead", "show", message.request_id, "--data", data).stdout
    assert "Traceback" in shown and "CompressedSamples^CT1" in shown  # for the operator who asks
