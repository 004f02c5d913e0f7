"""Runtime failures are a small tree: transient ones are retried, permanent ones are dead.

Every exception soupflow raises, where it comes from, and what a user sees of it:

* ActivityError (here)                      pipeline, activities -> the message's outcome
  + TransientError                          -> retried with backoff; dead at the last attempt
  + PermanentError                          -> dead at once, with its reason
* dicom (the wire)
  + ProtocolError (dicom.pdu)               acceptor -> A-ABORT with its reason, a log line
  + CommandError (dicom.dimse)              acceptor -> A-ABORT; requestor -> association lost
  + MalformedObjectError (dicom.part10)     ingest -> 0xC000; message -> Association.ParseError
  + RequestorError (dicom.requestor)        DICOM sender -> Transient/PermanentError by
    - NoConnectionError, AssociationLostError    its `transient`; `soupflow echo` -> exit 1
    - AssociationRejectedError, ContextRefusedError
* store
  + SpoolError (store.spool)                ingest -> 0xA700, the object removed
  + QueueError (store.queue)                ingest -> 0xA700; workers -> retried by lease expiry
    - LeaseLostError                        workers -> another owner took the message over
  + NoDataError (store)                     admin -> `status`/`dead`: exit 1, "no queue in ..."
* receivers
  + ReceiverError (receivers.base)          runtime -> that workflow's listener "failed"
* workflow (config: every one becomes a ConfigIssue with file, line and column)
  + JsonSyntaxError (workflow.jsonpos), PathError (workflow.paths),
    TemplateError (workflow.template)       checks -> ConfigIssue; at run time -> PermanentError
"""

from __future__ import annotations


class ActivityError(Exception):
    """An activity (or the steps before it) failed; `str(error)` is the reason an operator sees
    (and the logs carry: soupflow writes it without PHI). `detail` is kept in the dead record
    only: it may hold values from the message (a Python traceback)."""

    detail: str = ""


class TransientError(ActivityError):
    """Worth retrying later: network errors, timeouts, HTTP 5xx/408/429, a full disk."""


class PermanentError(ActivityError):
    """Retrying will not help: HTTP 4xx, a template or path that cannot work, an unsafe path."""
