"""What `serve-llm` does before the model loads: claim the port (so a taken port fails at once,
not after a build and a load), and turn SOURCE into an engine directory (built once into the
engine cache when it names a model rather than an engine)."""

from __future__ import annotations

import dataclasses
import errno
import socket

from kiln.server.config import ServerConfig, ServerConfigError


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C (a build in progress removes its temporary folder)."""
    raise SystemExit(128 + signum)


class PortInUseError(ServerConfigError):
    """The port is taken; the message says which and how to pick another."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens on it once the app is
    ready, so connections are refused, not queued, while the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: reuse a port in TIME_WAIT; a port some process listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {host} is already in use (another serve-llm?); choose another "
                                 f"with --port N (scripts/quickstart.sh: PORT=N)") from None
        raise ServerConfigError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


def resolve_engine(config: ServerConfig) -> ServerConfig:
    """``config`` with ``engine.engine_dir`` an engine directory: SOURCE itself, or its build
    in the engine cache; the served model name defaults to what was built (e.g. smollm2-135m)."""
    from kiln.engine_builder.engine_cache import prepare_engine

    prepared = prepare_engine(str(config.engine.engine_dir), config.build_options)
    engine = dataclasses.replace(config.engine, engine_dir=str(prepared.path))
    return dataclasses.replace(config, engine=engine, served_model_name=config.served_model_name or prepared.name)
