"""A site's long-lived worker: keeps the base model warm between Flower messages.

Under Flower's Deployment Engine every message reaches a fresh `flwr-clientapp`
process (see `fedtune.federated.siteapp`). That process now only forwards the
message over a Unix socket to this worker, which lives as long as the site: it
imports torch/transformers once and keeps fedtune's Workspace (base model, the
site's data and encoded features, keyed by run config) across rounds and runs,
exactly as the in-process federation does.

`run_site` starts the worker and the site's `flower-supernode` (with node config
`worker=<socket>`) together and stops both together: `fedtune site` and
`fedtune.deploy.LocalFederation` use it. Run as a module for the latter:

    python -m fedtune.federated.worker --socket /path/w.sock [--poll 0.25] -- flower-supernode ...

One message is handled at a time (a SuperNode hands its ClientApp one message at
a time). A message that fails is answered with the error, and the worker goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from flwr.app import Context, Message

from fedtune.errors import ConfigError
from fedtune.federated.siteapp import (
    WORKER_KEY,
    decode_request,
    encode_reply,
    recv_frame,
    send_frames,
)
from fedtune.federated.supernode import DEFAULT_POLL

log = logging.getLogger("fedtune.worker")

SOCKET_NAME = "worker.sock"
_MAX_PATH = 100
"""Unix socket paths are limited to ~107 bytes; longer ones go to a private temp dir."""


def socket_path(site_dir: str | Path) -> Path:
    """Where a site's worker listens: `site_dir`/worker.sock, or a private temporary
    folder when that path is too long for a Unix socket."""
    path = Path(site_dir).resolve() / SOCKET_NAME
    if len(str(path)) > _MAX_PATH:
        path = Path(tempfile.mkdtemp(prefix="fedtune-site-")) / SOCKET_NAME
    return path


class SiteWorker:
    """Serves messages forwarded by `siteapp` on a Unix socket (file mode 0600 in a
    0700 folder: only this user's processes reach it)."""

    def __init__(self, path: str | Path, out: TextIO | None = None) -> None:
        self.path = Path(path)
        self.out = out or sys.stdout
        self.handled = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    def _say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        print(f"[fedtune worker {stamp}] {text}", file=self.out, flush=True)

    def warm_up(self) -> float:
        """Import fedtune's ClientApp (torch, transformers, peft) now, before the first
        message; seconds it took."""
        t0 = time.perf_counter()
        import fedtune.federated.apps  # noqa: F401

        return time.perf_counter() - t0

    def bind(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            if _alive(self.path):
                raise ConfigError(f"{self.path}: another site worker is listening there; stop "
                                  "it first or give this site another --workdir")  # fmt: skip
            self.path.unlink()  # left by a worker that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(4)
        sock.settimeout(0.5)
        self._sock = sock

    def serve_forever(self) -> None:
        assert self._sock is not None, "bind() first"
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            with conn:
                conn.settimeout(None)
                try:
                    self._serve_one(conn)
                except Exception as err:  # never let one bad request end the service
                    traceback.print_exc(file=self.out)
                    self._say(f"failed to serve a request: {type(err).__name__}: {err}")
                    with contextlib.suppress(Exception):
                        send_frames(conn, *encode_reply(None, None, f"site worker: {err}"))

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            frames = [recv_frame(conn) for _ in range(3)]
        except (OSError, ValueError) as err:
            self._say(f"dropped a broken request: {err}")
            return
        header, msg, context = decode_request(frames)  # errors: answered by serve_forever
        t0 = time.perf_counter()
        reply, error = self.handle(msg, context)
        took = time.perf_counter() - t0
        self.handled += 1
        what = header.get("type", "?")
        self._say(f"{what} handled in {took:.2f} s" + (f" (failed: {error})" if error else ""))
        try:
            send_frames(conn, *encode_reply(reply, context, error))
        except OSError as err:  # the ClientApp process went away (e.g. its SuperNode stopped)
            self._say(f"could not send the reply for {what}: {err}")

    def handle(self, msg: Message, context: Context) -> tuple[Message | None, str]:
        from fedtune.federated.apps import client_app

        try:
            return client_app(msg, context), ""
        except Exception as err:  # answered to the ClientApp, which raises it to Flower
            traceback.print_exc(file=self.out)
            return None, f"{type(err).__name__}: {err}"

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def with_worker(supernode_cmd: Sequence[str], path: str | Path) -> list[str]:
    """`supernode_cmd` with `worker=<path>` added to its --node-config."""
    if "'" in str(path):
        raise ConfigError(f"{path}: a worker socket path must not contain a quote (')")
    cmd = list(supernode_cmd)
    item = f"{WORKER_KEY}='{Path(path)}'"
    for i, arg in enumerate(cmd):
        if arg == "--node-config" and i + 1 < len(cmd):
            if cmd[i + 1].endswith(".toml"):
                raise ConfigError("give the site's node config as key=value pairs, not a "
                                  f"TOML file ({cmd[i + 1]}): the worker adds {WORKER_KEY}=...")
            cmd[i + 1] = f"{cmd[i + 1]} {item}".strip()
            return cmd
        if arg.startswith("--node-config="):
            cmd[i] = f"{arg} {item}"
            return cmd
    return [*cmd, "--node-config", item]


def with_poll(supernode_cmd: Sequence[str], poll: float | None) -> list[str]:
    """`supernode_cmd` (flower-supernode ...) run through fedtune.federated.supernode,
    whose idle poll is `poll` seconds instead of Flower's 3 s (None: unchanged)."""
    cmd = list(supernode_cmd)
    if poll is None or not cmd or Path(cmd[0]).name != "flower-supernode":
        return cmd
    return [sys.executable, "-m", "fedtune.federated.supernode", "--fedtune-poll", str(poll),
            *cmd[1:]]  # fmt: skip


def run_site(supernode_cmd: Sequence[str], path: str | Path, env: dict[str, str] | None = None,
             out: TextIO | None = None, poll: float | None = DEFAULT_POLL) -> int:  # fmt: skip
    """Start the worker at `path`, then the SuperNode (`supernode_cmd`, node config
    `worker=<path>` added, idle poll `poll` s; see fedtune.federated.supernode);
    serve until the SuperNode exits or this process gets SIGTERM/SIGINT (then the
    SuperNode is stopped too). The SuperNode's exit code."""
    worker = SiteWorker(path, out)
    worker.bind()
    worker._say(f"listening on {worker.path}")
    worker._say(f"fedtune loaded in {worker.warm_up():.1f} s; starting the SuperNode")
    thread = threading.Thread(target=worker.serve_forever, name="fedtune-worker", daemon=True)
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        worker._say(f"signal {signum}: stopping the SuperNode")
        stopping.set()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    node: subprocess.Popen[bytes] | None = None
    try:
        thread.start()
        if not stopping.is_set():
            node = subprocess.Popen(with_poll(with_worker(supernode_cmd, worker.path), poll),
                                    env=env, stdin=subprocess.DEVNULL)  # fmt: skip
        while node is not None and node.poll() is None and not stopping.is_set():
            if not thread.is_alive():
                worker._say("the worker stopped serving: stopping the SuperNode")
                break
            time.sleep(0.2)
        code = _stop_node(node, STOP_TIMEOUT)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if node is not None and node.poll() is None:
            node.kill()
            node.wait()
        worker.close()
        thread.join(timeout=5)
    worker._say(f"SuperNode exited with code {code}; {worker.handled} messages handled")
    return code


STOP_TIMEOUT = 20.0
"""Seconds a SuperNode gets to sign off after SIGTERM before it is killed."""


def _stop_node(node: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """The SuperNode's exit code, stopping it first (SIGTERM, SIGKILL after `timeout`)."""
    if node is None:
        return 0
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    return int(node.returncode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="path of the worker's Unix socket")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL,
                        help="the SuperNode's idle poll in seconds (Flower: 3; 0 = Flower's)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the flower-supernode command line")  # fmt: skip
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the flower-supernode command after --")
    return run_site(cmd, args.socket, dict(os.environ), poll=args.poll or None)


if __name__ == "__main__":
    sys.exit(main())
