"""Real peers the forwarding tests start on loopback: an MLLP listener, and Orthanc with its
DICOMweb plugin (Debian's packages) in a temporary configuration."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

from bench.ingest import free_port
from tests.dicom import unavailable, wait_for

START, END = b"\x0b", b"\x1c\r"


class MllpPeer:
    """Receives framed HL7 messages; answers each with an ACK (`ack` code) or nothing. Each
    connection carries any number of messages until the sender closes it; `connections`
    counts them, and `drop_connections` closes the open ones as a restarted RIS would."""

    def __init__(
        self, ack: str | None = "AA", text: str = "", tls: ssl.SSLContext | None = None
    ) -> None:
        """`tls`: the server context (the port then speaks TLS only)."""
        self.ack, self.text, self.tls = ack, text, tls
        self.messages: list[str] = []
        self.connections = 0
        self.closed = 0  # connections this peer has closed
        self._open: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server.getsockname()[1])

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._open.append(connection)
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            if self.tls is not None:
                connection.settimeout(10)
                try:
                    connection = self.tls.wrap_socket(connection, server_side=True)
                except (ssl.SSLError, OSError):
                    return
            self._exchange(connection)
        finally:
            connection.close()
            self.closed += 1

    def _exchange(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        data = b""
        for _ in range(1000):  # bounded: no test sends more on one connection
            while END not in data:
                try:
                    chunk = connection.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            frame, data = data.split(END, 1)
            message = frame.removeprefix(START).decode("utf-8")
            self.messages.append(message)
            if self.ack is None:
                self._stopping.wait(3)  # hold the connection, never answer
                return
            control_id = message.split("\r")[0].split("|")[9] if message.count("|") > 9 else ""
            reply = f"MSH|^~\\&|RIS|HOSPITAL|SOUPFLOW||20260101||ACK|1|P|2.5.1\rMSA|{self.ack}|{control_id}|{self.text}\r"
            connection.sendall(START + reply.encode("utf-8") + END)

    def drop_connections(self) -> None:
        for connection in self._open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._open.clear()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.server.close()


def require_orthanc() -> str:
    program = shutil.which("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if program is None or not plugin.exists():
        unavailable(
            "Orthanc and orthanc-dicomweb are not installed (make test installs them as root)"
        )
    return program


class Orthanc:
    """Orthanc on loopback ports with its own storage, DICOM AE ORTHANC, DICOMweb on."""

    def __init__(self, folder: Path, **settings: Any) -> None:
        """`settings` are added to the configuration (DICOM TLS, say)."""
        self.program = require_orthanc()
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "soupflow-test",
                    "StorageDirectory": str(folder / "storage"),
                    "IndexDirectory": str(folder / "index"),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": False,
                    "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "StableAge": 1,
                    "HttpTimeout": 60,
                    **settings,
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        with (self.folder / "orthanc.log").open("ab") as log:  # the child keeps its copy
            self.process = subprocess.Popen(
                [self.program, str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        wait_for(self._answers, "Orthanc to answer")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError((self.folder / "orthanc.log").read_text(errors="replace")[-2000:])
        try:
            self.get("/system")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}{path}", timeout=30
        ) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, body: bytes) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = response.read()
        return json.loads(answer) if answer[:1] in (b"{", b"[") else answer

    def post_json(self, path: str, document: Any) -> Any:
        return self.post(path, json.dumps(document).encode("utf-8"))

    def instance_file(self, sop_instance_uid: str) -> bytes | None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/lookup",
            data=sop_instance_uid.encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            found = [entry for entry in json.loads(response.read()) if entry["Type"] == "Instance"]
        if not found:
            return None
        data: bytes = self.get(f"/instances/{found[0]['ID']}/file")
        return data
