"""The ``deepfm serve`` and ``deepfm export`` subcommands (light to import: heavy modules load when run)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from deepfm.errors import DeepFMError

        raise DeepFMError("deepfm serve needs FastAPI and uvicorn: pip install 'deepfm[serve]'") from None
    import torch

    from deepfm.artifact import read_info

    read_info(args.model_dir)  # a missing / incomplete model directory is a clear error, before any server
    threads = args.threads or max(1, (os.cpu_count() or 1) // (2 * args.workers))
    env = {"DEEPFM_SERVE_MODEL_DIR": os.path.abspath(args.model_dir), "DEEPFM_SERVE_MAX_ROWS": str(args.max_rows),
           "DEEPFM_SERVE_MAX_BODY": str(args.max_body_bytes), "DEEPFM_SERVE_FAST_ROWS": str(args.fast_path_rows),
           "DEEPFM_SERVE_RELOAD": "0" if args.no_reload_endpoint else "1", "DEEPFM_SERVE_THREADS": str(threads)}
    os.environ.update(env)
    sock = bind_socket(args.host, args.port)  # first: a taken port is a clear error, before the model loads
    opts = dict(log_level=args.log_level, access_log=args.access_log, timeout_graceful_shutdown=10)
    if args.workers > 1:
        config = uvicorn.Config("deepfm.serve.app:app_from_env", factory=True, workers=args.workers, **opts)
    else:
        torch.set_num_threads(threads)
        from deepfm.serve.app import app_from_env

        app = app_from_env()
        import gc

        gc.collect()
        gc.set_threshold(50_000, 20, 100)  # request garbage is short-lived: collect young objects rarely
        gc.freeze()  # the loaded model's objects leave the collector's scans: fewer latency spikes
        config = uvicorn.Config(app, **opts)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {args.model_dir} on http://{host}:{sock.getsockname()[1]}  (POST /v1/predict, GET /docs)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(config)
    if args.workers > 1:
        import inspect

        from uvicorn.supervisors import Multiprocess

        kwargs = {"target": server.run} if "target" in inspect.signature(Multiprocess).parameters else {}
        Multiprocess(config, sockets=[sock], **kwargs).run()
    else:
        server.run(sockets=[sock])
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here so that a taken port says what to do."""
    from deepfm.errors import DeepFMError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise DeepFMError(f"port {port} on {host} is already in use (another deepfm serve?). Choose another "
                              f"with --port, or find the process holding it: ss -ltnp 'sport = :{port}'") from None
        raise DeepFMError(f"cannot listen on {host}:{port}: {err.strerror} (check --host and --port)") from None
    sock.set_inheritable(True)
    return sock


def cmd_export(args: argparse.Namespace) -> int:
    from deepfm.export import export_model

    out = export_model(args.model_dir, args.format, args.output)
    print(f"Exported {args.format} model to {out} (vocabularies and export.json beside it; "
          "see docs/serving.md for the input encoding)")
    return 0


def register(sub) -> None:
    """Add ``deepfm serve`` and ``deepfm export`` to the CLI's subcommands."""
    s = sub.add_parser("serve", help="serve a model over an HTTP JSON API (POST /v1/predict)")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: cores / (2 * workers), at least 1)")
    s.add_argument("--max-rows", type=int, default=10_000, help="most rows per predict request")
    s.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="largest request body")
    s.add_argument("--fast-path-rows", type=int, default=8,
                   help="requests up to this many rows use the pure-Python encoder (0: never)")
    s.add_argument("--no-reload-endpoint", action="store_true",
                   help="disable POST /v1/reload (SIGHUP still reloads the current directory)")
    s.add_argument("--log-level", default="warning", help="uvicorn log level")
    s.add_argument("--access-log", action="store_true", help="log every request (costs latency)")
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export a model as ONNX or TorchScript over encoded inputs")
    x.add_argument("model_dir")
    x.add_argument("--format", "-f", choices=("onnx", "torchscript"), default="onnx",
                   help="ONNX (onnxruntime) or TorchScript")
    x.add_argument("--output", "-o", help="file to write (default: MODEL_DIR/export/model.onnx or "
                                          "model.torchscript.pt); vocabularies are copied beside it")
    x.set_defaults(func=cmd_export)
