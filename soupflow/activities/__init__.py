"""Activities: one module per sender kind, each with `run(setting, activity) -> Outcome`.

Upstream: pipeline.run. Adding a kind is one module and one line in `RUNNERS`; a test
(`test_schema.py`) keeps the registry and the model's sender classes in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from soupflow.activities import code, dicom_sender, file_writer, http, mllp, stow
from soupflow.activities.base import Activity, Outcome
from soupflow.workflow import model

Runner = Callable[[Any, Activity], Outcome]

RUNNERS: dict[type[model.SenderSetting], Runner] = {
    model.FileWriterSenderSetting: file_writer.run,
    model.HttpSenderSetting: http.run,
    model.DicomSenderSetting: dicom_sender.run,
    model.CodeSenderSetting: code.run,
    model.MLLPSenderSetting: mllp.run,
    model.StowRsSenderSetting: stow.run,
}
