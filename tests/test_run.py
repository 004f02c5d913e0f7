"""`soupflow run` as an operator sees it: the table, per-workflow failures, clean stop."""

from __future__ import annotations

import socket
from pathlib import Path

from tests import documents
from tests.dicom import RuntimeProcess, sample_file, send_files

OTHER_ID = "66666666-6666-4666-8666-666666666666"


def test_a_port_in_use_fails_only_its_workflow(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        documents.write(workflows / "a-taken.json", documents.workflow(Port=taken))
        free = documents.workflow(Port=0, AcceptedCallingAETs="*")
        free["WorkflowId"] = free["WorkflowPattern"][0]["Id"] = OTHER_ID
        documents.write(workflows / "b-free.json", free)
        runtime = RuntimeProcess(workflows, tmp_path / "data")
        try:
            assert send_files(runtime.ports[OTHER_ID], [sample_file("CT_small.dcm")]) == [0]
        finally:
            assert runtime.terminate() == 0
    log = runtime.log.read_text()
    assert (
        f"cannot listen on 127.0.0.1:{taken}: the port is already in use by another program" in log
    )
    assert "listening" in log


def test_sigterm_stops_cleanly_and_a_public_bind_is_warned_about(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    runtime = RuntimeProcess(workflows, tmp_path / "data", "--host", "0.0.0.0")
    assert runtime.refresh() == []  # listening on nothing yet, waiting for files
    assert runtime.terminate() == 0
    log = runtime.log_text()
    assert "listening on 0.0.0.0: DICOM traffic is unencrypted" in log
    assert "nothing listens yet (watching for files)" in log
    assert "stopping" in log
