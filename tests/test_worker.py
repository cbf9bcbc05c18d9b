"""The site worker (fedtune.federated.worker) and the thin ClientApp that forwards
to it (fedtune.federated.siteapp), without Flower processes: a worker thread on a
Unix socket in the test's folder."""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedtune.federated.apps as apps
from fedtune.errors import ConfigError
from fedtune.federated import siteapp
from fedtune.federated.siteapp import WORKER_KEY, SiteWorkerError, forward
from fedtune.federated.worker import SiteWorker, socket_path, with_worker

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")


@pytest.fixture()
def worker(tmp_path: Path) -> Iterator[SiteWorker]:
    w = SiteWorker(socket_path(tmp_path / "site"), StringIO())
    w.bind()
    thread = threading.Thread(target=w.serve_forever, daemon=True)
    thread.start()
    yield w
    w.close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Flower stamps new messages with the task's identity; here no Flower process sets it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _context(path: Path, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config={WORKER_KEY: str(path)},
                   state=state or RecordDict(), run_config={})  # fmt: skip


def test_socket_is_private_and_a_stale_one_is_replaced(worker: SiteWorker,
                                                      tmp_path: Path) -> None:  # fmt: skip
    mode = os.stat(worker.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(worker.path.parent).st_mode) == 0o700
    with pytest.raises(ConfigError, match="another site worker"):
        SiteWorker(worker.path).bind()  # that one is alive
    # A socket file left by a killed worker is not an obstacle.
    dead = tmp_path / "dead" / "worker.sock"
    dead.parent.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    again = SiteWorker(dead)
    again.bind()
    again.close()
    assert not dead.exists()


def test_a_message_goes_through_the_worker_and_back(
    worker: SiteWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    def fake_app(msg: Message, context: Context) -> Message:  # stands in for fedtune's
        seen.append((msg.metadata.message_type, dict(context.node_config)))
        context.state["kept"] = ConfigRecord({"round": 2})
        reply = RecordDict({"site": ConfigRecord({"name": "org-a", "echo": msg.content[
            "config"]["x"]})})  # fmt: skip
        return Message(reply, reply_to=msg)

    monkeypatch.setattr(apps, "client_app", fake_app)
    msg = Message(RecordDict({"config": ConfigRecord({"x": 41})}), dst_node_id=7,
                  message_type="train")  # fmt: skip
    msg.metadata.__dict__["_message_id"] = "m-1"
    context = _context(worker.path)
    reply = siteapp.handle(msg, context)
    assert reply.content["site"]["echo"] == 41
    assert reply.metadata.reply_to_message_id == "m-1"
    assert context.state["kept"]["round"] == 2  # the worker's Context changes come back
    assert seen == [("train", {WORKER_KEY: str(worker.path)})]
    assert worker.handled == 1


def test_errors_name_the_worker_and_the_fix(worker: SiteWorker, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def failing(msg: Message, context: Context) -> Message:
        raise ConfigError("site data file /x.csv not found")

    monkeypatch.setattr(apps, "client_app", failing)
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    with pytest.raises(SiteWorkerError, match=r"ConfigError: site data file /x\.csv"):
        forward(msg, _context(worker.path), str(worker.path), 10)
    # The worker goes on serving after a failed message.
    with pytest.raises(SiteWorkerError, match="ConfigError"):
        forward(msg, _context(worker.path), str(worker.path), 10)
    assert worker.handled == 2
    missing = tmp_path / "nowhere.sock"
    with pytest.raises(SiteWorkerError, match=r"no site worker at .*fedtune site"):
        forward(msg, _context(missing), str(missing), 10)


def test_supernode_command_gets_the_worker_in_its_node_config(tmp_path: Path) -> None:
    cmd = ["flower-supernode", "--node-config", "partition-id=0", "--port", "1"]
    out = with_worker(cmd, tmp_path / "w.sock")
    assert out[2] == f"partition-id=0 {WORKER_KEY}='{tmp_path / 'w.sock'}'"
    assert with_worker(["flower-supernode"], "/s")[-2:] == ["--node-config", f"{WORKER_KEY}='/s'"]
    equals_form = with_worker(["n", "--node-config=a=1"], "/s")
    assert equals_form == ["n", f"--node-config=a=1 {WORKER_KEY}='/s'"]
    with pytest.raises(ConfigError, match="key=value pairs"):
        with_worker(["n", "--node-config", "site.toml"], "/s")
    long_dir = tmp_path / ("x" * 120)
    assert len(str(socket_path(long_dir))) < 108  # Unix socket path limit


def test_supernode_poll_is_capped_and_flower_args_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib
    import time

    from fedtune.federated.supernode import DEFAULT_POLL, patch_poll, split_args

    assert split_args(["--superlink", "h:1"]) == (DEFAULT_POLL, ["--superlink", "h:1"])
    assert split_args(["--fedtune-poll", "0.5", "--insecure"]) == (0.5, ["--insecure"])
    with pytest.raises(SystemExit, match=r"0\.01 to 3"):
        split_args(["--fedtune-poll", "10"])
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    assert patch_poll(0.01)
    t0 = time.perf_counter()
    loop.time.sleep(3)  # Flower's idle wait
    assert time.perf_counter() - t0 < 0.5
    assert loop.time.monotonic() > 0  # the rest of `time` is untouched
    assert not patch_poll(0.01)  # already patched: not the layout it expects, left alone
