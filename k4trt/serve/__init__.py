"""`k4trt serve`: the pipeline behind an HTTP API in the shape of OpenAI's Videos API, on Ray Serve.

One module per job: `request` turns a POST body into a checked request (the checks `k4trt run` makes),
`store` keeps jobs in SQLite and results as atomic files (the store, not Ray, is the queue that survives a
restart), `dispatcher` hands queued jobs to the replicas, `worker` runs one job on a loaded `Pipeline`, `api` is
the FastAPI app, `metrics` its Prometheus text, `deployment` wires them into Ray Serve, and `lifecycle` owns the
store's lock and what a killed server left running. Only `deployment` and `lifecycle` import Ray or psutil,
and nothing outside this package imports it, so the rest of k4trt runs without the `[serve]` extra.
"""

from __future__ import annotations

from k4trt.errors import K4TRTError

MODEL = "kandinsky-4-t2v-flash"
APP_NAME = "k4trt"


def require_extra() -> None:
    """One clear line instead of an ImportError when the extra is missing (checked without importing Ray)."""
    import importlib.util

    modules = ("ray", "fastapi", "multipart", "prometheus_client", "psutil")
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise K4TRTError(f"k4trt serve needs {', '.join(missing)}; install them with: pip install 'k4trt[serve]'")
