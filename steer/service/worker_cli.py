"""`steer worker` (a training worker on any machine sharing the database and the adapter
storage) and the worker `steer serve` embeds when `fine_tuning` is on.

The embedded worker is a subprocess, never a thread of the server: training holds the CPU
and the GIL. It gets the server's own URL, database, model directory and `worker_threads`,
and a stable name (host and port), so a restarted server's worker fails the job its
predecessor left running. It dies with the server: the server names itself in
`STEER_SERVER_PID` (`steer.engine.lifeline`) and the worker watches it, killing its trainer
and itself when the server is gone, however the server ended; a clean shutdown stops it
with SIGTERM first (its running job is failed, "worker stopped").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

from steer.engine import lifeline
from steer.service.settings import Settings
from steer.store import Database
from steer.training.worker import WorkerConfig, run_worker

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 15.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="run a training worker (fine-tuning jobs from the store)")
    p.add_argument("--database-url", help="SQLAlchemy async URL (STEER_DATABASE_URL; default "
                   "SQLite in the cache dir)")
    p.add_argument("--server-url", required=True,
                   help="the Steer server that serves the trained adapters")
    p.add_argument("--api-key", help="the server's API key (STEER_API_KEY)")
    p.add_argument("--model-dir", help="the served base model's checkpoint directory "
                   "(default: STEER_MODEL, else the embedded default model)")
    p.add_argument("--threads", type=int, help="torch threads for training (worker_threads)")
    p.add_argument("--name", help="this worker's name in the store (default host:pid)")
    p.add_argument("--adapter-root", help="where adapters are written (STEER_ADAPTER_ROOT; "
                   "must be the servers' adapter root, on shared storage)")


def run(args: argparse.Namespace) -> int:
    from steer.service.cli import resolve_model  # (cli imports this module)

    overrides = {k: v for k, v in (("database_url", args.database_url),
                                   ("api_key", args.api_key),
                                   ("adapter_root", args.adapter_root)) if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lifeline.watch_server()  # embedded: die with the server (nothing when standalone)
    config = WorkerConfig(
        database_url=settings.db_url(), server_url=args.server_url,
        base_model_dir=args.model_dir or resolve_model(settings),
        adapters_dir=settings.adapters_dir(),
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        threads=args.threads or settings.worker_threads, max_lora_rank=settings.max_lora_rank,
        **({"name": args.name} if args.name else {}),
    )
    asyncio.run(run_worker(config))
    return 0


def start_embedded(settings: Settings, model_path: str) -> subprocess.Popen[bytes]:
    """Start the server's own worker (migrating the store first, so the two processes never
    race to create the schema)."""
    asyncio.run(_migrate(settings.db_url()))
    lifeline.export_server()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    cmd = [sys.executable, "-m", "steer.service.cli", "worker",
           "--database-url", settings.db_url(), "--server-url", f"http://{host}:{settings.port}",
           "--model-dir", str(Path(model_path)), "--threads", str(settings.worker_threads),
           "--name", f"{socket.gethostname()}:embedded:{settings.port}",
           "--adapter-root", str(settings.adapters_dir())]
    logger.info("starting the embedded training worker (%d thread(s))",
                settings.worker_threads)
    return subprocess.Popen(cmd)  # the API key, if any, is in the inherited environment


def stop_embedded(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _migrate(url: str) -> None:
    db = Database(url)
    try:
        await db.start()
    finally:
        await db.close()
