"""The DICOM wire and Part 10 files, for both roles. Imports nothing else from soupflow.

part10       Part 10 files: the file meta soupflow writes, identify(), read_object()
status       DIMSE statuses with their categories (one table for acceptor and requestor)
pdu          upper layer PDU framing: P-DATA fragments, A-RELEASE, A-ABORT
negotiation  A-ASSOCIATE: the request, the contexts we accept, the rejections by name
dimse        command sets (C-STORE, C-ECHO)
acceptor     one accepted association; calls one Handler object
requestor    associations we open (C-STORE, C-ECHO to a remote AE)
"""
