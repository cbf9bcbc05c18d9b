"""A site in one process (fedtune.federated.worker, fedtune.federated.supernode,
fedtune.federated.waits) without a SuperLink: the worker's handling of one task with
the Runtime API calls replaced, the command it gives Flower's SuperNode, and the
patches of Flower's waits on the installed Flower. The whole path, with processes,
is in test_deployment.py."""

from __future__ import annotations

import importlib
import io
import threading
import time
import zipfile
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.task_identity import TaskIdentity

import fedtune.federated.apps as apps
from fedtune.deploy import app_bundle
from fedtune.errors import ConfigError
from fedtune.federated import supernode, waits, worker
from fedtune.federated.worker import (
    CLIENT_APP,
    SiteWorker,
    app_component,
    in_process_isolation,
    runtime_address,
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Flower stamps new messages with the task's identity; here no Flower process sets it.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _fab(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


def test_fedtunes_app_names_the_client_app_the_worker_runs(tmp_path: Path) -> None:
    # What `fedtune submit` sends (a minimal bundle) and the project's own pyproject.
    bundle = (app_bundle(tmp_path / "app") / "pyproject.toml").read_text()
    assert app_component(_fab(bundle)) == CLIENT_APP
    project = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert app_component(_fab(project.read_text())) == CLIENT_APP
    assert app_component(_fab("[project]\nname = 'x'\n")) == ""


class _Runtime:
    """Stands in for the worker's Runtime API calls: one task, replies captured."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, message: Message, fab: bytes) -> None:
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []
        self.context = Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                               state=RecordDict(), run_config={})  # fmt: skip
        task = (message, self.context, SimpleNamespace(content=fab))
        monkeypatch.setattr(SiteWorker, "_pull_task_input", lambda _self, _client: task)
        monkeypatch.setattr(worker, "push_message",
                            lambda _client, reply, _context: self.pushed.append(reply))
        monkeypatch.setattr(worker, "push_task_output",
                            lambda client, context, sub_status, details:
                            self.outputs.append((sub_status, details)))  # fmt: skip
        monkeypatch.setattr(worker, "HeartbeatSender", _NoHeartbeat)


class _NoHeartbeat:
    is_running = False

    def __init__(self, _fn: Any) -> None:
        pass

    def start(self) -> None:
        pass


def _message() -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"x": 41})}), dst_node_id=7,
                  message_type="train")  # fmt: skip
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


def test_a_task_runs_fedtunes_client_app_in_this_process(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:  # fmt: skip
    seen: list[tuple[str, int]] = []

    def fake_app(msg: Message, context: Context) -> Message:  # stands in for fedtune's
        seen.append((msg.metadata.message_type, threading.get_ident()))
        context.state["kept"] = ConfigRecord({"round": 2})
        echo = RecordDict({"site": ConfigRecord({"echo": msg.content["config"]["x"]})})
        return Message(echo, reply_to=msg)

    monkeypatch.setattr(apps, "client_app", fake_app)
    bundle = (app_bundle(tmp_path / "app") / "pyproject.toml").read_text()
    rt = _Runtime(monkeypatch, _message(), _fab(bundle))
    out = StringIO()
    w = SiteWorker("127.0.0.1:1", b"secret", out)
    w.run_task("token")
    assert seen == [("train", threading.get_ident())]  # here, not in another process
    (reply,) = rt.pushed
    assert reply.content["site"]["echo"] == 41 and reply.metadata.reply_to_message_id == "m-1"
    assert rt.context.state["kept"]["round"] == 2  # pushed back with the task's output
    assert rt.outputs == [(SubStatus.COMPLETED, "")]
    assert w.handled == 1 and "train handled in" in out.getvalue()


def test_a_failing_task_is_answered_with_the_error(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:  # fmt: skip
    def failing(msg: Message, context: Context) -> Message:
        raise ConfigError("site data file /x.csv not found")

    monkeypatch.setattr(apps, "client_app", failing)
    bundle = (app_bundle(tmp_path / "app") / "pyproject.toml").read_text()
    rt = _Runtime(monkeypatch, _message(), _fab(bundle))
    w = SiteWorker("127.0.0.1:1", b"secret", StringIO())
    w.run_task("token")
    (reply,) = rt.pushed
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "site data file /x.csv not found" in str(reply.error.reason)
    assert rt.outputs[0][0] == SubStatus.FAILED
    # Another app's run is refused, not run with fedtune's ClientApp.
    other = bundle.replace(CLIENT_APP, "acme.app:client")
    rt = _Runtime(monkeypatch, _message(), _fab(other))
    w.run_task("token")
    (reply,) = rt.pushed
    assert reply.has_error() and "acme.app:client" in str(reply.error.reason)
    assert "fedtune's ClientApp only" in str(reply.error.reason)
    assert w.handled == 2  # and the worker goes on


def test_a_reply_that_cannot_be_pushed_is_answered_with_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(apps, "client_app", lambda msg, context: Message(RecordDict(),
                                                                         reply_to=msg))  # fmt: skip
    bundle = (app_bundle(tmp_path / "app") / "pyproject.toml").read_text()
    rt = _Runtime(monkeypatch, _message(), _fab(bundle))
    calls = []

    def push_once_fails(_client: Any, reply: Message, _context: Context) -> None:
        calls.append(reply)
        if len(calls) == 1:
            raise ConnectionError("the SuperNode went away")

    monkeypatch.setattr(worker, "push_message", push_once_fails)
    SiteWorker("127.0.0.1:1", b"secret", StringIO()).run_task("token")
    # Flower's SuperNode waits for a reply to every message it took: it gets one.
    assert len(calls) == 2 and calls[1].has_error()
    assert "the SuperNode went away" in str(calls[1].error.reason)
    assert rt.outputs[0][0] == SubStatus.FAILED


def test_a_worker_that_cannot_reach_its_supernode_gives_up(monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:  # fmt: skip
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(worker, "UNREACHABLE_LIMIT", 1.0)
    w = SiteWorker(f"127.0.0.1:{port}", b"secret", StringIO())
    with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} refused or did not answer"):
        w.serve_forever()


def test_supernode_command_runs_without_a_superexec() -> None:
    cmd = ["flower-supernode", "--superlink", "h:9092", "--host", "127.0.0.1", "--port", "9101"]
    assert runtime_address(cmd) == "127.0.0.1:9101"
    assert runtime_address(["flower-supernode", "--port=9200"]) == "127.0.0.1:9200"
    assert runtime_address(["flower-supernode"]) == "127.0.0.1:9094"  # Flower's default
    out = in_process_isolation(cmd, "/private/secret")
    assert out[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", "/private/secret"]
    with pytest.raises(ConfigError, match="--isolation"):
        in_process_isolation([*cmd, "--isolation", "subprocess"], "/s")
    with pytest.raises(ConfigError, match=r"--ssl-certfile.*--cold"):
        in_process_isolation([*cmd, "--ssl-certfile=/c.pem"], "/s")
    assert runtime_address(["n", "--host", "::1", "--port", "1"]) == "[::1]:1"
    assert runtime_address(["n", "--host", "0.0.0.0"]) == "127.0.0.1:9094"
    with pytest.raises(ConfigError, match=r"--poll 10.*0\.01 to 3"):
        worker.run_site(cmd, poll=10)


def test_run_site_refuses_a_port_in_use() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port}.*own --port"):
            worker.run_site(["flower-supernode", "--host", "127.0.0.1", "--port", str(port)])


def test_supernode_waits_are_tied_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = importlib.import_module(supernode.LOOP_MODULE)
    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(loop, name, getattr(loop, name))  # restored after the test
    calls: list[str] = []
    monkeypatch.setattr(loop, "_pull_and_store_message",
                        lambda **kw: kw.get("run_id"))  # fmt: skip
    ready = threading.Event()
    assert supernode.patch(0.01, lambda: calls.append("task"), ready)
    # A message stored -> the worker is told; none -> not.
    assert loop._pull_and_store_message(run_id=5) == 5
    assert loop._pull_and_store_message(run_id=None) is None
    assert calls == ["task"]
    t0 = time.perf_counter()
    loop.time.sleep(3)  # Flower's idle wait: capped at the poll
    assert time.perf_counter() - t0 < 0.5
    ready.set()
    t0 = time.perf_counter()
    loop.time.sleep(0.5)  # Flower's wait for the reply: ends when the worker says so
    assert time.perf_counter() - t0 < 0.1 and not ready.is_set()
    assert loop.time.monotonic() > 0  # the rest of `time` is untouched
    assert loop.pull_objects.keywords["initial_backoff"] == waits.INITIAL
    assert not supernode.patch(0.01, lambda: None, ready)  # not Flower's layout any more


def test_shorter_object_waits_only_where_flower_has_them(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         ) -> None:  # fmt: skip
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.setattr(grid, "pull_objects", grid.pull_objects)  # restored after the test
    assert waits.shorten_pulls(grid.__name__)
    assert grid.pull_objects.keywords == {"initial_backoff": waits.INITIAL,
                                          "backoff_cap": waits.CAP,
                                          "max_tries_per_object": waits.MAX_TRIES}  # fmt: skip
    assert waits.shorten_pulls(grid.__name__)  # twice: unchanged
    assert not waits.shorten_pulls("json")
    assert "keeps Flower's 1-10 s waits" in caplog.text


def test_telemetry_stays_off_when_the_site_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower reads the variable when its telemetry module is imported, which happens
    # before `fedtune site` sets up the site's environment.
    telemetry = importlib.import_module("flwr.supercore.telemetry")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    worker._telemetry_from_environment()
    assert telemetry.FLWR_TELEMETRY_ENABLED == "0"
