"""Python code steps: `PythonCallable` on the code sender and on the code transformer action.

Upstream: pipeline.transformers (the action), activities.code (the sender).

`package.module:function` is imported (from `PYTHONPATH`, or the workflows folder, which the
runtime puts on the import path) and called with one `CodeStep`: a read-only copy of the
DICOM message, the variables, `set_variable`, and the activity's message to read or replace.
An exception is a permanent failure: the message is dead with the exception's type in its
reason and the traceback kept in the dead record only (a traceback can hold PHI; logs never).
"""

from __future__ import annotations

import copy
import importlib
import traceback
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from soupflow.pipeline.context import RunContext
from soupflow.pipeline.errors import PermanentError


class CodeStep:
    """What a Python code step sees and may change."""

    def __init__(self, context: RunContext, activity_id: str | None) -> None:
        self._context = context
        self._activity_id = activity_id
        self.message: Mapping[str, Any] = MappingProxyType(copy.deepcopy(context.message))
        self.request_id = context.arrival.request_id
        self.sop_instance_uid = context.arrival.sop_instance_uid

    @property
    def variables(self) -> Mapping[str, str]:
        return MappingProxyType(dict(self._context.variables))

    def set_variable(self, name: str, value: object) -> None:
        self._context.variables[name.strip().lower()] = "" if value is None else str(value)

    @property
    def activity_message(self) -> str:
        return self._context.outbound.get(self._activity_id or "", "")

    @activity_message.setter
    def activity_message(self, text: str) -> None:
        if self._activity_id is None:
            raise PermanentError("a receiver-level code step has no activity message to set")
        self._context.outbound[self._activity_id] = str(text)


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


def call(python_callable: str, context: RunContext, activity_id: str | None) -> object:
    """Run the callable; its exception becomes a permanent error with the traceback kept."""
    function = _load(python_callable)
    try:
        return function(CodeStep(context, activity_id))
    except PermanentError:
        raise
    except BaseException as exc:  # sys.exit() or any BaseException must not end the worker
        error = PermanentError(f"PythonCallable {python_callable} raised {type(exc).__name__}")
        error.detail = traceback.format_exc()
        raise error from None
