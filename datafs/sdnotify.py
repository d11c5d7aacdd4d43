"""Tell systemd (or any supervisor speaking its protocol) how the daemon is doing.

With `Type=notify` systemd considers the service started only once it gets
`READY=1` on the unix datagram socket named by `$NOTIFY_SOCKET`, so units
ordered after datafs start when /data is the mount, not the bare directory
beneath it. The protocol is one datagram per message; a name starting with
'@' is in the abstract namespace. Without the variable (a shell, a container)
this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd", extra={"socket": address, "error": exc.strerror})
        return False
    return True
