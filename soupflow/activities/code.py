"""Code sender (`CodeSenderSetting`): run a `PythonCallable` as an activity (`pipeline.code`).

What the callable returns (if not None) becomes the activity's response message.
"""

from __future__ import annotations

from soupflow.activities.base import Activity, Outcome
from soupflow.pipeline.code import call
from soupflow.workflow import model


def run(setting: model.CodeSenderSetting, activity: Activity) -> Outcome:
    result = call(
        setting.python_callable, activity.context, activity.activity_id, setting.timeout_seconds
    )
    return Outcome(result, "returned")
