"""`k4trt serve`: the pipeline behind an HTTP video API (OpenAI's Videos API shape) on Ray Serve.

Ray, FastAPI and psutil are imported only when the command runs, so `k4trt --help` stays instant and the rest of
k4trt works without the `[serve]` extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from k4trt import config
from k4trt.errors import K4TRTError
from k4trt.runtime import BACKENDS
from k4trt.serve import APP_NAME

if TYPE_CHECKING:
    from k4trt.serve.deployment import Settings

DEFAULT_STORE = Path("k4trt-store")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve generation over HTTP (OpenAI Videos API shape) on Ray Serve",
        description="Serve Kandinsky 4.0 T2V Flash over HTTP: POST /v1/videos queues a job, GET /v1/videos/ID "
        "polls it, GET /v1/videos/ID/content downloads the MP4 (PNG for seconds 0). Each replica loads one "
        "pipeline once and makes one video at a time; jobs queue in front and live in the --store folder "
        "(SQLite + files), so a restart on the same store resumes them. SIGTERM or Ctrl-C stops the server and "
        "the local Ray cluster it started.",
    )
    p.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder (default: ./weights)")
    p.add_argument("--engines", type=Path, help="engines folder from build-engines (for --backend trt|onnxruntime)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="trt: TensorRT engines (fastest); torch: PyTorch reference; onnxruntime: the exported graphs")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="where replicas run; default: cuda when this machine sees a GPU, else cpu. A cuda replica "
                   "takes one GPU")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="pipelines serving at once, each one GPU with --device cuda (default 1)")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE,
                   help=f"folder for the job database and the videos (default ./{DEFAULT_STORE}); one server per store")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (run on one of its nodes: the store is local) instead of starting one")
    p.add_argument("--token-env", metavar="VAR",
                   help="require `Authorization: Bearer <token>` on every route but /healthz, the token being the "
                   "value of environment variable VAR")
    p.set_defaults(command=serve)


class _Stop(BaseException):
    """Raised by SIGTERM/SIGINT in the main thread, so a stop interrupts startup as well as the wait."""


def _on_signal(signum: int, frame: object) -> None:
    # Once stopping, further signals would only interrupt the shutdown that stops the Ray processes.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def _catch_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)


def _token(variable: str | None) -> str | None:
    if variable is None:
        return None
    token = os.environ.get(variable, "")
    if not token.strip():
        raise K4TRTError(f"--token-env {variable}: that environment variable is empty or not set; export it with "
                         "the token clients must send")
    return token.strip()


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise K4TRTError(f"--port {port} is not a port number (1-65535)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise K4TRTError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); choose another "
                         "--port, or stop what holds it") from None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def serve(args: argparse.Namespace) -> int:
    from k4trt.runtime.pipeline import model_facts
    from k4trt.serve import require_extra

    started = time.perf_counter()
    require_extra()
    if args.replicas < 1:
        raise K4TRTError(f"--replicas {args.replicas}: serve with at least one replica")
    token = _token(args.token_env)
    # Also checks the weights folder (or the engines' manifest) before anything starts.
    released = config.is_released(model_facts(args.weights, args.backend, args.engines).dit_config)
    device = args.device or _default_device()
    store = args.store.resolve()
    if store.exists() and not store.is_dir():
        raise K4TRTError(f"--store {args.store} is a file; give a folder (it is created if missing)")
    if args.ray_address is None:
        _check_port(args.host, args.port)

    from k4trt.serve import lifecycle

    try:
        with lifecycle.store_lock(store):
            ended = lifecycle.end_leftovers(store)
            if ended:
                print(f"ended {len(ended)} processes a killed k4trt serve on this store left running "
                      f"(pids {', '.join(map(str, ended))})", flush=True)
            _run(args, store, device, released, token, started)
    except _Stop as stop:
        print(f"stopped ({stop}); unfinished jobs stay in {store} for the next start", flush=True)
    return 0


def _run(args: argparse.Namespace, store: Path, device: str, released: bool, token: str | None,
         started: float) -> None:
    local = args.ray_address is None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        # Ray's switch for a cluster that lives on one machine (read when Ray is imported): every port it opens
        # stays on loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    _catch_signals()
    import ray
    from ray import serve as ray_serve

    from k4trt.serve import lifecycle
    from k4trt.serve.deployment import build_app

    try:
        ray.init(address="local" if local else args.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except ConnectionError as error:
        raise K4TRTError(f"--ray-address {args.ray_address}: no Ray cluster answers there ({error})") from None
    _catch_signals()  # ray.init installs its own SIGTERM handler
    try:
        if local:
            lifecycle.record_processes(store)
        settings = _settings(args, store, device, released, token, ray.cluster_resources(),
                             ray.util.get_node_ip_address())
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        try:
            ray_serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        except RuntimeError as error:
            raise K4TRTError(f"the server did not start: {_cause(error, ray_serve.status())}") from None
        if local:
            lifecycle.record_processes(store)  # now with the replicas
        session = ray.get_runtime_context().get_session_name()  # the replicas' logs: <Ray's temp dir>/SESSION/logs
        print(f"k4trt serve: {settings.replicas} replica{'s' if settings.replicas > 1 else ''} "
              f"({settings.backend}, {settings.device}) ready at http://{args.host}:{args.port}/v1/videos in "
              f"{time.perf_counter() - started:.1f} s; store {store}; Ray {session}", flush=True)
        while True:
            signal.pause()
    finally:
        # A local cluster goes whole, its replicas with it (nothing in them needs a graceful stop: jobs in flight
        # are still in progress in the store); on a shared cluster only this application goes.
        if not local:
            ray_serve.delete(APP_NAME)
        ray.shutdown()
        if local:
            lifecycle.forget_processes(store)


def _settings(args: argparse.Namespace, store: Path, device: str, released: bool, token: str | None,
              resources: Mapping[str, float], node_ip: str) -> Settings:
    from k4trt.serve.deployment import Settings

    node_resource = f"node:{node_ip}"
    if node_resource not in resources:
        raise K4TRTError(f"--ray-address {args.ray_address}: this machine ({node_ip}) is not a node of that cluster; "
                         "run k4trt serve on one of its nodes, since the store is a folder here")
    if device == "cuda":
        gpus = resources.get("GPU", 0)
        if gpus < args.replicas:
            raise K4TRTError(f"--replicas {args.replicas} --device cuda needs {args.replicas} GPUs; the Ray cluster "
                             f"has {gpus:g}")
        cpus_per_replica = 1.0
    else:
        cpus = resources.get("CPU", 0)
        if cpus < args.replicas:
            raise K4TRTError(f"--replicas {args.replicas} --device cpu needs a CPU core each; the Ray cluster has "
                             f"{cpus:g}")
        cpus_per_replica = float(int(cpus // args.replicas))  # Ray gives each that many PyTorch threads
    return Settings(weights=args.weights.resolve(), engines=args.engines.resolve() if args.engines else None,
                    backend=args.backend, device=device, replicas=args.replicas, cpus_per_replica=cpus_per_replica,
                    store=store, node_resource=node_resource, released=released, token=token)


def _cause(error: BaseException, status: object) -> str:
    """Ray's deploy failure only names the deployment; the replica's traceback is in the deployment's status
    message, and its K4TRTError line (or else its last line) says what to fix."""
    application = getattr(status, "applications", {}).get(APP_NAME)
    messages = [d.message for d in application.deployments.values()] if application is not None else []
    lines = [line.strip() for text in (*messages, str(error)) for line in text.splitlines() if line.strip()]
    for line in lines:
        if "K4TRTError:" in line:
            return line.split("K4TRTError:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__
