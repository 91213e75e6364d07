"""A throwaway PostgreSQL cluster (tests and benchmarks/bench_cluster.py): Debian's binaries
(/usr/lib/postgresql/<version>/bin), initdb in a temp dir, a free port on 127.0.0.1 only, a private
socket dir, run as the `postgres` user when running as root (initdb refuses root); removed after."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Unavailable(Exception):
    """No PostgreSQL here: no binaries, no `postgres` user to run them as root, or it did not start."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    if not found:
        raise Unavailable("no PostgreSQL binaries (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def cluster(durable: bool = False) -> Iterator[str]:
    """Start a cluster, yield its URL without a database (`postgresql+psycopg://postgres@127.0.0.1:PORT`),
    stop and delete it. `durable=False` turns fsync off (tests); True keeps the server's defaults."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="mmsearch-pg-"))  # not under pytest's tmp: its parents are root-only
    as_user: list[str] = []
    try:
        if os.geteuid() == 0:
            try:
                shutil.chown(root, "postgres", "postgres")
            except LookupError:
                raise Unavailable("running as root and there is no `postgres` user to run initdb as") from None
            as_user = ["runuser", "-u", "postgres", "--"]
        data, port = root / "data", _free_port()
        fast = "" if durable else " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"

        def run(*args: str) -> None:
            done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise Unavailable(f"{Path(args[0]).name} failed: {(done.stdout + done.stderr).strip()[-500:]}")

        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-locale", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1{fast}")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
