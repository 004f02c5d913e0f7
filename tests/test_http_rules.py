"""The HTTP senders' status rules as one table, through httpx's MockTransport (no socket);
one loopback test per sender stays in test_processing.py and test_mllp_and_stow_senders.py."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from soupflow.activities.http import send
from soupflow.pipeline.errors import ActivityError, PermanentError, TransientError

Handler = Callable[[httpx.Request], httpx.Response]


def answering(status: int) -> Handler:
    return lambda request: httpx.Response(status)


def raising(error: type[Exception]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)  # type: ignore[call-arg]

    return handler


RULES: list[tuple[str, Handler, type[ActivityError] | None]] = [
    ("200 succeeds", answering(200), None),
    ("201 succeeds", answering(201), None),
    ("204 succeeds", answering(204), None),
    ("500 is transient", answering(500), TransientError),
    ("503 is transient", answering(503), TransientError),
    ("408 is transient", answering(408), TransientError),
    ("429 is transient", answering(429), TransientError),
    ("400 is permanent", answering(400), PermanentError),
    ("404 is permanent", answering(404), PermanentError),
    ("409 is permanent", answering(409), PermanentError),
    ("301 is permanent (not followed)", answering(301), PermanentError),
    ("a refused connection is transient", raising(httpx.ConnectError), TransientError),
    ("a read timeout is transient", raising(httpx.ReadTimeout), TransientError),
]


@pytest.mark.parametrize(("rule", "handler", "expected"), RULES, ids=[r[0] for r in RULES])
def test_status_rules(rule: str, handler: Handler, expected: type[ActivityError] | None) -> None:
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        if expected is None:
            assert send(client, "server", "POST", "http://peer.test/x").status_code >= 200
            return
        with pytest.raises(expected) as raised:
            send(client, "server", "POST", "http://peer.test/x")
        assert type(raised.value) is expected


def test_a_url_that_is_not_one_is_permanent() -> None:
    with (
        httpx.Client(transport=httpx.MockTransport(answering(200))) as client,
        pytest.raises(PermanentError, match="valid URL"),
    ):
        send(client, "${Host}", "POST", "http://[::1")


def test_a_409_reason_is_added_when_the_sender_reads_one() -> None:
    with (
        httpx.Client(transport=httpx.MockTransport(answering(409))) as client,
        pytest.raises(PermanentError, match="Failure Reason 0xA700"),
    ):
        send(
            client,
            "server",
            "POST",
            "http://peer.test/x",
            conflict_reason=lambda response: "Failure Reason 0xA700",
        )


def test_reasons_name_the_configured_server_never_the_expanded_url() -> None:
    with (
        httpx.Client(transport=httpx.MockTransport(answering(503))) as client,
        pytest.raises(TransientError) as raised,
    ):
        send(client, "http://ris/${PatientID}", "POST", "http://ris/DOE-JOHN")
    assert "DOE-JOHN" not in str(raised.value)
    assert "${PatientID}" in str(raised.value)
