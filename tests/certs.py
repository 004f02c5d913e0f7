"""The tests' certificates (bench.certs makes them): one CA with a server and a client, and a
stranger from another CA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.certs import Authority, Issued

__all__ = ["Authority", "Issued", "Pki"]


class Pki:
    """One CA with a server and a client, and a second CA nobody trusts."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.issue("soupflow server")
        self.client = self.ca.issue("modality one", client=True)
        self.stranger = Authority(folder / "other", "another CA").issue("intruder", client=True)

    def listener(self, **fields: Any) -> dict[str, Any]:
        return {
            "UseSsl": True,
            "CertificateFile": str(self.server.certificate),
            "PrivateKeyFile": str(self.server.key),
            "AuthenticationType": 2,
            "TrustedCertificatesFile": str(self.ca.path),
            **fields,
        }
