"""How each single service process runs: JSON logging, the API under gunicorn, Flower with saved state."""

from __future__ import annotations

import gc
import json
import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import Any

from gunicorn import glogging
from gunicorn.config import AccessLogFormat

from core.settings import Settings

DEFAULT_ACCESS_LOG_FORMAT = AccessLogFormat.default

# --- logging --------------------------------------------------------------------------------------------


def json_formatter_config(service: str) -> dict[str, Any]:
    """A logging.config formatter entry: JSON lines, with `extra=` fields (job_id, batch_id) kept."""
    return {
        "()": "pythonjsonlogger.orjson.OrjsonFormatter",  # the library's fast path: a fifth less CPU a line
        "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
        "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        "static_fields": {"service": service},
    }


def logging_config(service: str, level: str = "INFO") -> dict[str, Any]:
    """dictConfig for a service process: everything as JSON on stderr; chatty HTTP client logs quieter."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    quiet = {"level": "WARNING", "handlers": ["console"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": json_formatter_config(service)},
        "handlers": {"console": handler},
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "httpx": quiet,
            "httpcore": quiet,
            "gunicorn.error": {"level": level, "handlers": ["console"], "propagate": False},
            "gunicorn.access": {"level": level, "handlers": ["console"], "propagate": False},
        },
    }


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON lines on stderr; job and batch ids passed as `extra=` become fields of the record."""
    logging.config.dictConfig(logging_config(service, level))


def keep_celery_logging() -> None:
    """Stop Celery from replacing the JSON handlers with its own (connecting setup_logging does that)."""
    from celery.signals import setup_logging

    @setup_logging.connect(weak=False)
    def _keep(**_: Any) -> None:
        return None


# --- single services (the `nexusgen api` and `nexusgen flower` commands) --------------------------------


# The codes of the answers gunicorn gives itself, before the app sees a request (request line too long,
# header fields too large, malformed HTTP).
GUNICORN_ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own error answers as our error object instead of an HTML page."""
    from gunicorn.util import write_nonblock

    code = GUNICORN_ERROR_CODES.get(status_int, "bad_request")
    body = json.dumps({"error": {"code": code, "message": mesg or reason, "details": None}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    write_nonblock(sock, head.encode("latin1") + body)


class AccessLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, writing the access line of its default format without building its dict of every
    request header, response header and environ variable for each request (which only a custom
    `access_log_format` can use). Sampled by py-spy under bench/bench_get.py's load, gunicorn's own took
    11% of a worker's CPU and this one takes 6.5%, most of it in the logging module."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if self.cfg.access_log_format != DEFAULT_ACCESS_LOG_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        sent = getattr(resp, "sent", None)
        line = (
            f"{environ.get('REMOTE_ADDR', '-')} - {self._get_user(environ) or '-'} {self.now()} "
            f'"{environ["REQUEST_METHOD"]} {environ["RAW_URI"]} {environ["SERVER_PROTOCOL"]}" {status} '
            f"{sent if sent is not None else '-'} "
            f'"{environ.get("HTTP_REFERER", "-")}" "{environ.get("HTTP_USER_AGENT", "-")}"'
        )
        self.access_log.info(line)  # logging reports a handler's failure itself; the request goes on


def serve_api(settings: Settings, *, workers: int, threads: int) -> None:
    """Run `api.app:create_app(settings)` under gunicorn (threaded workers) on the configured address."""
    import gunicorn.util
    from gunicorn.app.base import BaseApplication

    # gunicorn writes its pre-app errors through this one function (workers inherit it by fork).
    gunicorn.util.write_error = write_json_error

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.api_host}:{settings.api_port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", "-")
            self.cfg.set("logger_class", AccessLogger)
            self.cfg.set("logconfig_dict", logging_config("api", settings.log_level))
            # one control socket per state dir, so that several stacks on one machine do not collide
            self.cfg.set("control_socket", str(settings.state_dir.resolve() / "gunicorn.ctl"))

        def load(self) -> Any:
            from api.app import create_app

            app = create_app(settings)
            # The app's objects live as long as the worker: out of the collector's sight, a full collection
            # no longer walks them all (a 100-150 ms pause of every thread of the worker, measured).
            gc.collect()
            gc.freeze()
            return app

    _Gunicorn().run()


# The tasks page shows what each batch is and what became of its jobs (name, args, kwargs, result).
FLOWER_TASK_COLUMNS = "name,uuid,state,args,kwargs,result,received,started,runtime,worker"


def flower_env(settings: Settings) -> dict[str, str]:
    """The FLOWER_* variables (login, URL prefix) that Flower reads itself, from the Settings."""
    return {k: v for k, v in settings.to_env().items() if k.startswith("FLOWER_")}


def run_flower(settings: Settings, *, address: str, port: int, db_path: Path) -> None:
    """Replace this process with Flower on the broker, keeping its state in `db_path` across restarts.

    Login and URL prefix travel as FLOWER_* environment variables (Flower's own), not on the command
    line where `ps` would show a password.
    """
    assert settings.broker_url is not None
    db_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "celery", f"--broker={settings.broker_url}", "--config=nexusgen.flower_config",
        "flower",
        f"--address={address}", f"--port={port}", "--persistent=True", f"--db={db_path}",
        "--state_save_interval=30000", "--purge_offline_workers=60",
        f"--tasks_columns={FLOWER_TASK_COLUMNS}",
    ]  # fmt: skip
    os.execve(sys.executable, argv, {**os.environ, **flower_env(settings)})
