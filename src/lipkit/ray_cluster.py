"""Joining a Ray cluster (or starting a local Ray instance) for the jobs that run on Ray Data:
``lipkit embed --ray`` and ``lipkit data curate --ray``."""

from __future__ import annotations

import os
import socket

from lipkit.errors import LipkitError


def connect(address: str, num_cpus: int | None = None) -> bool:
    """Join (or start) Ray; True when this call started it (and so should stop it).

    Args:
        address: ``ray://HOST:PORT``, ``HOST:PORT``, ``auto``, or ``local`` to start an instance here.
        num_cpus: CPUs of a ``local`` instance (default: Ray's choice).

    Raises:
        LipkitError: Ray is not installed, or the cluster cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise LipkitError("--ray needs Ray Data: pip install 'ray[data]'") from None
    check_reachable(address)  # an address given and not answering is refused, even with Ray already joined
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LipkitError(f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody answers: Ray itself would retry for minutes.

    Raises:
        LipkitError: The address does not accept connections.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address in ("local", "auto") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise LipkitError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}") from None
