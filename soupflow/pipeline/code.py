"""Python code steps: `PythonCallable` on the code sender and on the code transformer action.

Upstream: pipeline.transformers (the action), activities.code (the sender).

`package.module:function` is imported (from `PYTHONPATH`, or the workflows folder, which the
runtime puts on the import path) and called with one `CodeStep`: a read-only copy of the
DICOM message, the variables, `set_variable`, and the activity's message to read or replace.

The call runs in a child process (one per worker thread, started at its first code step and
kept), so that nothing the code does can take the runtime down: an exception, `sys.exit()` or
`os._exit()` is a permanent failure, and a call that runs past `TimeoutSeconds` has its process
killed. Each makes the message dead with a one-line reason; a traceback is kept in the dead
record only (it can hold PHI; logs never). The child gets plain data and sends back the
variables it set, the activity message and the returned value (as text).
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import signal
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import MappingProxyType
from typing import Any

from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import PermanentError


class CodeStep:
    """What a Python code step sees and may change."""

    def __init__(self, call: Call) -> None:
        self.message: Mapping[str, Any] = MappingProxyType(call.message)
        self.request_id = call.request_id
        self.sop_instance_uid = call.sop_instance_uid
        self._variables = call.variables
        self._has_activity = call.has_activity
        self._activity_message = call.activity_message
        self.set_variables: dict[str, str] = {}
        self.new_activity_message: str | None = None

    @property
    def variables(self) -> Mapping[str, str]:
        return MappingProxyType(self._variables | self.set_variables)

    def set_variable(self, name: str, value: object) -> None:
        self.set_variables[name.strip().lower()] = "" if value is None else str(value)

    @property
    def activity_message(self) -> str:
        if self.new_activity_message is not None:
            return self.new_activity_message
        return self._activity_message

    @activity_message.setter
    def activity_message(self, text: str) -> None:
        if not self._has_activity:
            raise PermanentError("a receiver-level code step has no activity message to set")
        self.new_activity_message = str(text)


@dataclass(frozen=True)
class Call:
    """One code step's input, as sent to the child process."""

    python_callable: str
    message: dict[str, Any]
    variables: dict[str, str]
    activity_message: str
    has_activity: bool
    request_id: str
    sop_instance_uid: str


@dataclass
class Reply:
    """What the child sends back: the changes, or the failure (reason, traceback)."""

    result: str | None = None
    set_variables: dict[str, str] = field(default_factory=dict)
    activity_message: str | None = None
    failure: str | None = None
    detail: str = ""


def _load(python_callable: str) -> Callable[[CodeStep], object]:
    module_name, _, attribute = python_callable.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise PermanentError(
            f"PythonCallable {python_callable} cannot be imported: {type(exc).__name__}"
        ) from None
    if not callable(target):
        raise PermanentError(f"PythonCallable {python_callable} is not callable")
    return target  # type: ignore[no-any-return]


def _run(call: Call) -> Reply:
    """In the child: import and call; every exception, SystemExit included, is a failure."""
    try:
        function = _load(call.python_callable)
    except PermanentError as exc:
        return Reply(failure=str(exc))
    step = CodeStep(call)
    try:
        result = function(step)
    except PermanentError as exc:
        return Reply(failure=str(exc))
    except BaseException as exc:  # sys.exit() or any BaseException ends this call only
        return Reply(
            failure=f"PythonCallable {call.python_callable} raised {type(exc).__name__}",
            detail=traceback.format_exc(),
        )
    return Reply(
        None if result is None else str(result), step.set_variables, step.new_activity_message
    )


def _end_with_parent() -> None:
    """Linux: the kernel kills this child when the runtime dies (even by kill -9)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed pipe ends an idle child
        pass


def _serve(connection: Connection) -> None:
    """The child's loop: one call at a time until the runtime closes its end."""
    _end_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the runtime, which stops us
    while True:
        try:
            call = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply = _run(call)
            connection.send(reply)
        except Exception as exc:  # an unpicklable value, say: a failure of this call only
            connection.send(Reply(failure=f"PythonCallable {call.python_callable}: {exc!r}"))


class CodeHost:
    """One child process that runs code steps, restarted after a crash or a time-out."""

    def __init__(self) -> None:
        self._process: Any = None
        self._connection: Connection | None = None
        self._finalizer: weakref.finalize[Any, CodeHost] | None = None

    def _start(self) -> Connection:
        if self._connection is None:
            context = multiprocessing.get_context("spawn")  # never fork a threaded runtime
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve, args=(theirs,), name="soupflow-code", daemon=True
            )
            process.start()
            theirs.close()
            self._process, self._connection = process, ours
            self._finalizer = weakref.finalize(self, _stop, process, ours)
        return self._connection

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._process = self._connection = self._finalizer = None

    def run(self, call: Call, timeout: float) -> Reply:
        connection = self._start()
        try:
            connection.send(call)
            if connection.poll(timeout):
                reply: Reply = connection.recv()
                return reply
        except (EOFError, OSError):
            code = self._exit_code()
            self.stop()
            return Reply(
                failure=f"PythonCallable {call.python_callable} ended its process"
                f" (exit code {code})"
            )
        self.stop()
        return Reply(
            failure=f"PythonCallable {call.python_callable} ran past its TimeoutSeconds"
            f" ({timeout:g} s) and was stopped"
        )

    def _exit_code(self) -> object:
        if self._process is None:
            return None
        self._process.join(5)
        return self._process.exitcode


def _stop(process: Any, connection: Connection) -> None:
    connection.close()
    if process.is_alive():
        process.kill()
    process.join(5)


_hosts = threading.local()


def _host() -> CodeHost:
    host: CodeHost | None = getattr(_hosts, "host", None)
    if host is None:
        host = _hosts.host = CodeHost()
    return host


def call(
    python_callable: str, context: RunContext, activity_id: str | None, timeout: float
) -> str | None:
    """Run the callable in this thread's code process; apply what it set; return its result.

    A failure of any kind is a PermanentError (the dead record keeps the traceback)."""
    outbound = context.outbound.get(activity_id or "", "") if activity_id else ""
    request = Call(
        python_callable,
        context.message,
        dict(context.variables),
        outbound,
        activity_id is not None,
        context.arrival.request_id,
        context.arrival.sop_instance_uid,
    )
    reply = _host().run(request, timeout)
    if reply.failure is not None:
        error = PermanentError(reply.failure)
        error.detail = reply.detail
        raise error
    context.variables.update(reply.set_variables)
    if reply.activity_message is not None and activity_id is not None:
        context.outbound[activity_id] = reply.activity_message
    return reply.result
