"""`llmrun serve`: an OpenAI- and Ollama-compatible HTTP server with continuous batching (see app.py for the
routes, scheduler.py for the batching, static/ for the chat page at /)."""
from __future__ import annotations

from .app import create_app
from .host import ModelHost
from .state import ServerConfig

__all__ = ["create_app", "ModelHost", "ServerConfig", "serve"]


def serve(model_path, config: ServerConfig, *, n_ctx: int = 4096, n_threads: int | None = None,
          parallel: int = 4, alias: str | None = None, loras=(), announce=print,
          cache_types: tuple = (None, None)) -> None:
    """Load the model, bind the socket, serve until SIGINT/SIGTERM; then stop accepting, let running requests
    finish (up to config.drain_seconds) and return."""
    import signal
    import socket

    import uvicorn

    from ..errors import LlmrunError

    # The address first (a busy port fails at once, not after loading), listening only once the model is in.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise LlmrunError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    try:
        host = ModelHost(model_path, n_ctx=n_ctx, n_threads=n_threads, n_slots=parallel, alias=alias, loras=loras,
                         cache_types=cache_types)
    except BaseException:
        sock.close()
        raise
    sock.listen(128)
    port = sock.getsockname()[1]
    app = create_app(host, config)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="info" if config.log_requests else "warning", access_log=config.log_requests,
        timeout_graceful_shutdown=int(config.drain_seconds), lifespan="on"))
    shown = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    extras = (f", {len(loras)} LoRA adapter(s)" if loras else "") + ("; API key required" if config.api_key else "")
    announce(f"llmrun: serving {host.name} on http://{shown}:{port} ({parallel} slots of {host.n_ctx} tokens)"
             + extras)
    # uvicorn re-raises the signal that stopped it once it has shut down; a handler of ours (instead of the
    # default, which kills the process) lets that end in a normal return and exit status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        host.close()
