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
    from deepfm.artifact import read_info
    from deepfm.serve.settings import from_args

    read_info(args.model_dir)  # a missing / incomplete model directory is a clear error, before any server
    settings = from_args(args, model_dir=os.path.abspath(args.model_dir))
    threads = settings.threads or max(1, (os.cpu_count() or 1) // (2 * settings.workers))
    settings = settings.model_copy(update={"threads": threads})
    sock = bind_socket(settings.host, settings.port)  # first: a taken port is a clear error, before the model loads
    opts = dict(log_level=settings.log_level, access_log=settings.access_log, timeout_graceful_shutdown=10,
                timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.limit_concurrency,
                http="deepfm.serve.limits:HeaderTimeoutProtocol")
    banner = f"Serving {args.model_dir} on http://{_host(settings.host)}:{sock.getsockname()[1]}  " \
                  "(POST /v1/predict, GET /docs)"
    if settings.workers > 1:
        _shared_metrics_folder()  # before prometheus_client is imported: it picks its mode then
        from deepfm.serve.prefork import serve_forked

        print(banner, file=sys.stderr, flush=True)
        return serve_forked(settings, sock, opts)
    config = uvicorn.Config(_one_worker_app(settings), **opts)
    config.deepfm_header_timeout = settings.header_timeout_s  # read by HeaderTimeoutProtocol (travels with config)
    print(banner, file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _one_worker_app(settings, peers=None):
    """The app in this process: its settings object handed over as it is (``peers``: a forked worker's link
    to its parent, ``deepfm.serve.peers``)."""
    import gc

    import torch

    from deepfm.serve.app import create_app

    torch.set_num_threads(settings.threads)
    app = create_app(settings.model_dir, settings, peers=peers)
    gc.collect()
    gc.set_threshold(50_000, 20, 100)  # request garbage is short-lived: collect young objects rarely
    gc.freeze()  # the loaded model's objects leave the collector's scans: fewer latency spikes
    return app


def _shared_metrics_folder() -> None:
    """``--workers N``: the folder where every worker writes its metrics (prometheus_client's multiprocess
    mode), fresh for this server and removed when it stops; set before any worker imports prometheus_client."""
    import atexit
    import shutil
    import tempfile

    from deepfm.serve.settings import MULTIPROC_ENV  # (not metrics: that imports prometheus_client)

    if os.environ.get(MULTIPROC_ENV):
        return  # the operator's own folder (kept, as they chose it)
    folder = tempfile.mkdtemp(prefix="deepfm-serve-metrics-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[MULTIPROC_ENV] = folder


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

    if args.quantize == "int8":
        from deepfm.artifact import load_model
        from deepfm.quantize import save_int8

        table = save_int8(load_model(args.model_dir, shared_table=True))
        print(f"Wrote the row-wise int8 table to {table} (deepfm serve --quantize int8 loads it)")
    out = export_model(args.model_dir, args.format, args.output, quantize=args.quantize)
    print(f"Exported {args.format} model to {out} (vocabularies and export.json beside it; "
          "see docs/serving.md for the input encoding)")
    return 0


def register(sub) -> None:
    """Add ``deepfm serve`` and ``deepfm export`` to the CLI's subcommands."""
    s = sub.add_parser("serve", help="serve a model over an HTTP JSON API (POST /v1/predict)")
    s.add_argument("model_dir")
    from deepfm.serve.settings import add_arguments

    add_arguments(s)  # one flag per setting (deepfm.serve.settings.ServeSettings: defaults, help, env names)
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser("export", help="export a model as ONNX or TorchScript over encoded inputs")
    x.add_argument("model_dir")
    x.add_argument("--format", "-f", choices=("onnx", "torchscript"), default="onnx",
                   help="ONNX (onnxruntime) or TorchScript")
    x.add_argument("--output", "-o", help="file to write (default: MODEL_DIR/export/model.onnx or "
                                          "model.torchscript.pt); vocabularies are copied beside it")
    x.add_argument("--quantize", choices=("int8",), help="int8: the graph holds a row-wise int8 table, and the "
                                                         "model directory gets it too (model.int8.safetensors, "
                                                         "for deepfm serve --quantize int8)")
    x.set_defaults(func=cmd_export)
