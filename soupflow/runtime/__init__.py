"""The running product. Upstream: cli (`run`).

    supervisor      Runtime: start, reload (plan, then apply), stop
    reconcile       plan(running, scanned): what to start, replace and stop; pure
    watch           the workflows folder: a change is a trigger to rescan
    workers         lease -> DICOM message -> pipeline -> finish; backoff; lease renewal
    listeners_file  the listener table and <data>/listeners.json (admin reads it alone)

Nothing is imported here, so `soupflow status` (admin) reads the listeners file without
loading the receivers, the workers, or their network clients.
"""
