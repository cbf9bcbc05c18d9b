"""A site in one long-lived process: Flower's SuperNode and a worker that runs the
site's ClientApp, so the base model stays warm between Flower messages.

Flower (1.40/1.41) runs every message a SuperNode receives in a fresh
`flwr-clientapp` process, started by a SuperExec that polls the SuperNode's local
Runtime API for tasks (Flower issue #3670): importing torch and transformers and
loading the base model would cost every site seconds per round, and even a ClientApp
that imports only Flower costs 1.5-2 s per message to start. `fedtune site`
therefore runs the SuperNode with `--isolation process` (it then starts no SuperExec)
in this process, and a worker thread takes the SuperExec's place: woken by the
SuperNode when a message is in (fedtune.federated.supernode), it takes the task from
the Runtime API and runs it right here, doing what `flwr-clientapp` does (pull the
message and the Context with the task's token, run the ClientApp, push the reply and
the Context, heartbeat meanwhile) with fedtune's ClientApp, whose Workspace (base
model, the site's data and encoded features) lives as long as the site, exactly as
in the in-process federation.

Only fedtune's ClientApp runs here: a run whose app names another ClientApp gets an
error reply (start a plain `flower-supernode` for other apps). Task acquisition is
signed with a random secret shared with the SuperNode only (Flower's SuperExec
authentication), so another local process cannot take this site's messages.

Written by hand because Flower has no long-lived ClientApp process; built on
Flower's runtime modules (`flwr.supernode.runtime.run_clientapp`,
`flwr.supercore.runtime`), which are not a public API: fedtune pins flwr to the
versions this was tested with, and `available()` says whether the installed one
has them (`fedtune site` falls back to Flower's process per message otherwise).

    python -m fedtune.federated.worker [--poll 0.25] -- flower-supernode ...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fedtune.errors import ConfigError
from fedtune.federated import supernode, waits
from fedtune.federated.supernode import DEFAULT_POLL

log = logging.getLogger("fedtune.worker")

CLIENT_APP = "fedtune.federated.apps:client_app"
"""The ClientApp this worker runs (the `clientapp` component of fedtune's app)."""
TASK_POLL = 0.05
"""Seconds between the worker's polls of its SuperNode for a task when the SuperNode
does not wake it (another Flower layout)."""
RETRY_SECONDS = 120.0
"""How long one Runtime API call of a task is retried when the SuperNode does not
answer."""
UNREACHABLE_LIMIT = 60.0
"""Seconds the worker keeps trying a SuperNode API that does not answer or refuses
it before it stops the site (exit code 1)."""
POLL_RANGE = (0.01, 3.0)
"""Allowed idle poll of the SuperLink, seconds."""
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


try:  # Flower's runtime modules: not a public API (see the module docstring)
    import httpx
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.config import get_fab_config
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        AcquireTaskRequest,
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    _MISSING = ""
except ImportError as err:  # another Flower: `fedtune site` runs Flower's way (--cold)
    _MISSING = str(err)


def available() -> bool:
    """Whether the installed Flower has the runtime pieces the worker is built on."""
    return not _MISSING


@functools.lru_cache(maxsize=8)  # a run sends the same FAB with every message
def app_component(fab_content: bytes) -> str:
    """The `clientapp` component named by a FAB (Flower app bundle)."""
    try:
        return str(get_fab_config(fab_content)["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (KeyError, TypeError, ValueError):
        return ""


class SiteWorker:
    """Takes this site's ClientApp tasks from its SuperNode's Runtime API (at
    `address`, host:port) and runs them in this process."""

    def __init__(self, address: str, secret: bytes, out: TextIO | None = None,
                 poll: float = TASK_POLL) -> None:  # fmt: skip
        self.address = address
        self.out = out or sys.stdout
        self.poll = poll
        self.handled = 0
        self.task_ready = threading.Event()
        """Set when the SuperNode has a task (fedtune.federated.supernode.patch)."""
        self.reply_ready = threading.Event()
        """Set by the worker when a task's reply is pushed (the SuperNode's wait ends)."""
        self.woken = False
        """Whether the SuperNode sets `task_ready`; else the worker polls every `poll` s."""
        self.on_connected: Any = None
        """Called once, when the SuperNode's Runtime API first answers."""
        self.failed = ""
        """Why the worker stopped serving, if it failed."""
        self._secret = secret
        self._stop = threading.Event()
        if _MISSING:
            raise ConfigError(
                f"this Flower lacks what the site worker needs ({_MISSING}); "
                "run the site with --cold or install a flwr fedtune supports"
            )

    def say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        print(f"[fedtune worker {stamp}] {text}", file=self.out, flush=True)

    def warm_up(self) -> float:
        """Import fedtune's ClientApp (torch, transformers, peft) now, before the first
        message; seconds it took."""
        t0 = time.perf_counter()
        import fedtune.federated.apps  # noqa: F401

        return time.perf_counter() - t0

    def _client(self, *interceptors: Any, retry: bool = True) -> Any:
        # Not Flower's make_simple_http_retry_invoker: on a 401 it SIGINTs its own
        # process (right for a flwr-clientapp process; here it would stop the site).
        # Transport errors and 502/503/504 are retried for up to RETRY_SECONDS; any
        # other HTTP error is raised to the caller.
        def give_up(err: Exception) -> bool:
            return isinstance(err, httpx.HTTPStatusError) and err.response.status_code not in (
                502, 503, 504)  # fmt: skip

        invoker = RetryInvoker(
            wait_gen_factory=lambda: exponential(base_delay=0.1, max_delay=2),
            recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
            max_tries=None if retry else 1, max_time=RETRY_SECONDS, should_giveup=give_up,
        )  # fmt: skip
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          *interceptors],
            retry_invoker=invoker)  # fmt: skip

    def serve_forever(self) -> None:
        """Poll for tasks and run them until `close()`."""
        signer = SuperExecAuthHttpInterceptor(master_secret=self._secret,
                                              protected_methods={_ACQUIRE})  # fmt: skip
        client = self._client(signer, retry=False)
        wanted = [str(TaskType.CLIENT_APP)]
        unreachable = 0
        try:
            while not self._stop.is_set():
                self.task_ready.clear()
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=wanted))
                    unreachable = 0
                    if self.on_connected is not None:
                        self.on_connected()
                        self.on_connected = None
                except Exception as err:  # the SuperNode is starting, or stopping
                    unreachable += 1
                    if self._stop.is_set():
                        break
                    if unreachable * 0.5 >= UNREACHABLE_LIMIT:
                        raise RuntimeError(f"the SuperNode's API at {self.address} refused or "
                                           f"did not answer for {UNREACHABLE_LIMIT:.0f} s: "
                                           f"{err}") from err  # fmt: skip
                    self._stop.wait(0.5)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    self.reply_ready.set()
                else:  # woken by the SuperNode; the timeout is a safety net
                    self.task_ready.wait(1.0 if self.woken else self.poll)
        finally:
            client.close()

    def serve_or_stop(self) -> None:
        """`serve_forever`; if it ever fails, stop this process's SuperNode (SIGTERM)
        rather than leave it taking messages nobody answers (`failed` is then set)."""
        try:
            self.serve_forever()
        except BaseException as err:
            traceback.print_exc(file=self.out)
            self.failed = f"{type(err).__name__}: {err}"
            self.say(f"the worker failed ({self.failed}): stopping the site")
            os.kill(os.getpid(), signal.SIGTERM)

    def run_task(self, token: str) -> None:
        """One ClientApp task, as `flwr-clientapp --token` runs it, in this process. A
        ClientApp that raises is answered with an error reply; the worker goes on."""
        from fedtune.federated.apps import client_app

        client = self._client(RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context, status, details, what = None, SubStatus.FAILED, "ClientApp task failed", "?"
        message, replied = None, False
        t0 = time.perf_counter()
        times = {"pull": 0.0, "app": 0.0, "push": 0.0}
        try:
            message, context, fab = self._pull_task_input(client)
            what = message.metadata.message_type
            times["pull"] = time.perf_counter() - t0
            try:
                if (component := app_component(fab.content)) != CLIENT_APP:
                    raise ConfigError(
                        f"this site runs fedtune's ClientApp only ({CLIENT_APP}); the run's "
                        f"app names {component or 'none'}: run it on a plain flower-supernode"
                    )
                reply = client_app(message, context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as err:  # answered to the server, as flwr-clientapp does
                traceback.print_exc(file=self.out)
                details = f"{type(err)}:<'{err}'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=details), reply_to=message)  # fmt: skip
            times["app"] = time.perf_counter() - t0 - times["pull"]
            push_message(client, reply, context)
            replied = True
        except Exception as err:  # the SuperNode went away, refused the token, ...
            traceback.print_exc(file=self.out)
            status, details = SubStatus.FAILED, f"fedtune worker: {type(err).__name__}: {err}"
            if message is not None and context is not None and not replied:
                # Flower's SuperNode waits for a reply to every message it took: without
                # one it would never take the next. Answer with the error if we can.
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details)
                with contextlib.suppress(Exception):
                    push_message(client, Message(error, reply_to=message), context)
        finally:
            with contextlib.suppress(Exception):
                push_task_output(client=client, context=context, sub_status=status,
                                 details=details)  # fmt: skip
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        self.handled += 1
        took = time.perf_counter() - t0
        times["push"] = took - times["pull"] - times["app"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in times.items())
        failed = "" if status == SubStatus.COMPLETED else f"; failed: {details}"
        self.say(f"{what} handled in {took:.2f} s ({parts}{failed})")

    def _pull_task_input(self, client: Any) -> tuple[Any, Any, Any]:
        """The task's Message, Context and FAB, as Flower's `pull_task_input` gets
        them, but waiting for the message's objects with fedtune's short backoff
        (`fedtune.federated.waits`): the SuperNode announces a task before it has the
        message's objects from the SuperLink, and Flower's own backoff starts at 1 s."""
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        fab = fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        for _ in range(100):  # a task is created a moment before its message is stored
            if pulled.messages_list:
                break
            time.sleep(0.02)
            pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("the SuperNode announced a task without a message (2 s)")
        node, run_id = Node(node_id=context.node_id), context.run_id
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived,
                                                      node, run_id),
            return_type=Message, initial_backoff=waits.INITIAL, backoff_cap=waits.CAP,
            max_tries_per_object=waits.MAX_TRIES,
        )  # fmt: skip
        message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
        return message, context, fab

    def close(self) -> None:
        self._stop.set()
        self.task_ready.set()


# --- the site: worker + SuperNode in one process ----------------------------------


def runtime_address(supernode_cmd: Sequence[str]) -> str:
    """host:port of the Runtime API the SuperNode of `supernode_cmd` serves."""

    def option(name: str, default: str) -> str:
        for i, arg in enumerate(supernode_cmd):
            if arg == name and i + 1 < len(supernode_cmd):
                return supernode_cmd[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return default

    host = option("--host", "127.0.0.1")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{option('--port', '9094')}"


def in_process_isolation(supernode_cmd: Sequence[str], secret_file: str | Path) -> list[str]:
    """`supernode_cmd` with `--isolation process` (no SuperExec: the worker takes its
    tasks) and the SuperExec secret that signs task acquisition."""
    cmd = list(supernode_cmd)
    for flag in ("--isolation", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile",
                 "--superexec-auth-secret-file"):  # fmt: skip
        if any(a == flag or a.startswith(flag + "=") for a in cmd):
            raise ConfigError(
                f"{flag}: the site worker runs in the SuperNode's process and sets up its "
                "local Runtime API itself (127.0.0.1, signed task requests); drop the flag, "
                "or run Flower's way with --cold"
            )
    return [*cmd, "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]


def run_site(supernode_cmd: Sequence[str], env: dict[str, str] | None = None,
             out: TextIO | None = None, poll: float | None = DEFAULT_POLL) -> int:  # fmt: skip
    """Run the site in this process: Flower's SuperNode (`supernode_cmd`, a
    `flower-supernode` command line, in process isolation, idle poll `poll` s; see
    fedtune.federated.supernode) in the main thread, and the worker that runs its
    ClientApp tasks in another. Returns when the SuperNode exits (SIGTERM/SIGINT
    stop it); its exit code. `env` is added to this process's environment."""
    from fedtune.deploy import DeploymentError, check_port_free

    if poll is not None and not POLL_RANGE[0] <= poll <= POLL_RANGE[1]:
        raise ConfigError(f"--poll {poll}: give {POLL_RANGE[0]} to {POLL_RANGE[1]} seconds")
    os.environ.update(env or {})
    _telemetry_from_environment()
    address = runtime_address(supernode_cmd)
    host, port = address.rsplit(":", 1)
    try:
        check_port_free(host.strip("[]"), int(port))
    except DeploymentError as err:
        raise ConfigError(f"the SuperNode's local API: {err} (each site on a machine needs "
                          "its own --port)") from None  # fmt: skip
    secret = secrets.token_bytes(32)
    worker = SiteWorker(address, secret, out)
    worker.say(f"fedtune loaded in {worker.warm_up():.1f} s; starting the SuperNode")
    worker.woken = supernode.patch(poll or 3.0, worker.task_ready.set, worker.reply_ready)
    # The SuperNode reads the secret from a file at start: it lives in a private
    # folder until the SuperNode answers the worker, then it is removed.
    private = Path(tempfile.mkdtemp(prefix="fedtune-site-"))  # 0700
    worker.on_connected = lambda: shutil.rmtree(private, ignore_errors=True)
    try:
        secret_file = private / "superexec.secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        thread = threading.Thread(target=worker.serve_or_stop, name="fedtune-worker",
                                  daemon=True)  # fmt: skip
        thread.start()
        code = supernode.run(in_process_isolation(supernode_cmd, secret_file)[1:])
        worker.close()
        thread.join(timeout=2)  # Flower force-exits 5 s after a signal
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if worker.failed and code == 0:
        code = 1  # the SuperNode stopped because the worker failed: not a clean exit
    worker.say(f"SuperNode exited with code {code}; {worker.handled} messages handled")
    return code


def _telemetry_from_environment() -> None:
    """Flower reads FLWR_TELEMETRY_ENABLED once, when its telemetry module is first
    imported; a site that set it in `env` after that still means it."""
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None and hasattr(telemetry, "FLWR_TELEMETRY_ENABLED"):
        setattr(telemetry, "FLWR_TELEMETRY_ENABLED", os.environ.get("FLWR_TELEMETRY_ENABLED", "1"))  # noqa: B010


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--poll",
        type=float,
        default=DEFAULT_POLL,
        help="the SuperNode's idle poll in seconds (Flower: 3; 0 = Flower's)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the flower-supernode command line")  # fmt: skip
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the flower-supernode command after --")
    try:
        return run_site(cmd, poll=args.poll or None)
    except ConfigError as err:
        parser.exit(2, f"fedtune worker: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
