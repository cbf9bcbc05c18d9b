"""Run a federation on Flower's Deployment Engine: one SuperLink (the server side,
which also runs the `ServerApp`) and one SuperNode per site (which runs the
`ClientApp` on the site's own data), on one machine or several.

Secure by default (verified with flwr 1.41 on loopback): the SuperLink serves TLS
with the certificate from `fedtune certs` (`fedtune.certs.make_certs`) and refuses
SuperNodes whose public key was not registered (`flwr supernode register`); a
SuperNode checks the SuperLink's certificate against the federation's CA and signs
its requests with its site key. `insecure=True` (plain HTTP, no node
authentication) must be asked for and logs a warning.

Building blocks, each usable on its own machine:

    # the server
    cmd = superlink_command(certs, port=9092, state_dir=Path("state"))
    # the server's operator, once the SuperLink is up
    write_connection(home, "fed", "server.example.org:9092", certs.ca_cert)
    node_id = register_site(home, "fed", certs.site_public_key("site-a"))
    # each site
    cmd = supernode_command("server.example.org:9092", {"partition-id": 0,
                            "num-partitions": 3}, ca_cert=..., auth_key=...)
    # anyone holding a connection: the fedtune app, 2 rounds
    run = submit(find_app_dir(), "fed", home, fedtune_run_config(config, out))

`LocalFederation` starts a SuperLink and N SuperNodes on this machine as
subprocesses (logs in a folder), waits (bounded) until every node is connected and
stops them all on exit: for tests and demos.

Every wait is bounded. Failures (a missing binary, a port in use, a process that
exits early, a `flwr` command that fails or hangs) raise `DeploymentError`, a
`FedtuneError`, quoting the last lines of the relevant log.

How Flower runs the apps (1.41): the SuperLink starts a `flwr-serverapp` process
per run; each SuperNode starts a fresh `flwr-clientapp` process per message, so a
site reloads Python, torch and the base model every round. With runtime dependency
installation disabled (the default here) these processes import the `fedtune`
installed in the environment of the SuperLink/SuperNode (the first `flower-*` on
`PATH`, which `flower_env` puts this interpreter's `bin/` in front of): every
party must install the same fedtune version; the app bundle (FAB) that `flwr run`
uploads is only a label then (its `src/` is not on `sys.path`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedtune.certs import FederationCerts
from fedtune.errors import ConfigError, DeploymentError

log = logging.getLogger("fedtune.deploy")

ConfigValue = str | int | float | bool
"""A value of a Flower run config or node config."""

SUPERLINK_PORT = 9092
"""The SuperLink's default port here (Fleet, Control and ServerApp APIs on one port)."""
SUPERNODE_PORT = 9094
"""A SuperNode's local Runtime API port (Flower's default); one per SuperNode."""
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Seconds between a SuperExec's polls for new app processes to start (Flower: 1 s)."""
TAIL_LINES = 25
"""How many log lines an error message quotes."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# --- environment, binaries, ports, logs ---------------------------------------


def _bin_dir() -> Path:
    """This interpreter's scripts folder (a venv's `bin/`), not resolved: a venv's
    python is a symlink to the base interpreter, whose folder has no Flower."""
    return Path(sys.executable).parent


def flower_binary(name: str) -> str:
    """The path of a Flower executable (`flower-superlink`, `flower-supernode`,
    `flwr`), preferring the one beside this interpreter."""
    local = _bin_dir() / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(
            f"{name} not found (looked in {_bin_dir()} and on PATH): install Flower in "
            "this environment (`pip install 'flwr>=1.40,<1.42'`, a fedtune dependency)"
        )
    return found


def flower_env(flwr_home: str | Path | None = None,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The environment for Flower processes: this one, with this interpreter's
    `bin/` first on PATH (the app processes Flower starts must import the same
    fedtune and torch), telemetry and update checks off (no process of a federation
    reaches the internet), `FLWR_HOME` when given, then `extra`."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(_bin_dir()), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # else each process asks flower.ai
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise DeploymentError if something listens on (host, port) already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise DeploymentError(
                f"port {port} on {host} is in use ({err.strerror}): stop what listens "
                "there or choose another port"
            ) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_tail(path: str | Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file, without terminal colours ('' if none)."""
    p = Path(path)
    if not p.is_file():
        return ""
    with p.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


def _quote(text: str) -> str:
    return "\n  | " + text.replace("\n", "\n  | ") if text.strip() else " (empty)"


# --- config strings and files -------------------------------------------------------


def _toml_value(key: str, value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"config value of {key!r} spans lines; give it on one line")
    if "'" not in text:
        return f"'{text}'"  # a TOML literal string: no escapes (Windows paths, ';')
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise ConfigError(f"config value of {key!r} holds both quote characters: {text!r}")


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """`key=value` pairs in the form `flwr run --run-config` and
    `flower-supernode --node-config` parse (strings quoted, TOML scalars)."""
    for key in values:
        if not key or not _BARE_KEY.match(key):
            raise ConfigError(f"config key {key!r}: use letters, digits, '-' or '_'")
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in values.items())


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for nested tables of scalars (what Flower's config.toml holds)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((f"{prefix}{_toml_key(key)}", value))
        elif isinstance(value, bool | int | float):
            lines.append(f"{_toml_key(key)} = {_toml_value(key, value)}")
        elif isinstance(value, str | list):  # JSON strings and lists of them are TOML
            lines.append(f"{_toml_key(key)} = {json.dumps(value)}")
        else:
            raise ConfigError(f"cannot write {key!r} = {value!r} to Flower's config.toml")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + _dump_toml(table, f"{name}.")
    return out


def write_connection(flwr_home: str | Path, name: str, address: str,
                     ca_cert: str | Path | None = None, *, insecure: bool = False,
                     default: bool = True) -> Path:  # fmt: skip
    """Add (or replace) the SuperLink connection `name` in `flwr_home`/config.toml,
    the file the `flwr` CLI reads when `FLWR_HOME` is `flwr_home`. `address` is the
    SuperLink's `host:port`; TLS is verified against `ca_cert` (the federation's
    root certificate) unless `insecure`. Returns the file's path."""
    if not _BARE_KEY.match(name):
        raise ConfigError(f"connection name {name!r}: use letters, digits, '-' or '_'")
    entry: dict[str, Any] = {"address": address}
    if insecure:
        log.warning("connection %r to %s is insecure: no TLS, anyone on the network can "
                    "read and alter the traffic", name, address)  # fmt: skip
        entry["insecure"] = True
    else:
        if ca_cert is None or not Path(ca_cert).is_file():
            raise ConfigError(
                f"connection {name!r}: the root certificate {ca_cert} is missing; give the "
                "federation's ca.crt (`fedtune certs`), or insecure=True to connect without TLS"
            )
        entry["root-certificates"] = str(Path(ca_cert).resolve())
        entry["insecure"] = False
    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    superlink = data.setdefault("superlink", {})
    superlink[name] = entry
    if default or "default" not in superlink:
        superlink["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(_dump_toml(data), encoding="utf-8")
    tmp.replace(path)
    return path


# --- commands -------------------------------------------------------------------------


def superlink_command(certs: FederationCerts | None, port: int = SUPERLINK_PORT,
                      state_dir: str | Path = ".", *, host: str = "0.0.0.0",
                      insecure: bool = False,
                      install_dependencies: bool = False) -> list[str]:  # fmt: skip
    """The `flower-superlink` command line: TLS with the federation's server
    certificate, SuperNode authentication (only registered keys may connect),
    state in `state_dir`/state.db (runs, registered nodes; survives restarts).

    One port serves the Fleet API (SuperNodes), the Control API (`flwr` CLI) and
    the ServerApp API. `install_dependencies=False` runs the apps in the existing
    environment (no `uv sync` of the app's dependencies per run)."""
    cmd = [flower_binary("flower-superlink")]
    if insecure:
        log.warning("SuperLink without TLS and without SuperNode authentication (insecure): "
                    "any SuperNode may join and all traffic is readable")  # fmt: skip
        cmd.append("--insecure")
    else:
        if certs is None:
            raise ConfigError("a secure SuperLink needs the federation's certificates "
                              "(`fedtune certs`); or pass insecure=True")  # fmt: skip
        for p in (certs.ca_cert, certs.server_cert, certs.server_key):
            if not p.is_file():
                raise ConfigError(f"{p} is missing: make the certificates with `fedtune certs`")
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert.resolve()),
                "--ssl-certfile", str(certs.server_cert.resolve()),
                "--ssl-keyfile", str(certs.server_key.resolve()),
                "--enable-supernode-auth"]  # fmt: skip
    cmd += ["--database", str((Path(state_dir) / "state.db").resolve())]
    if not install_dependencies:
        cmd.append("--disable-runtime-dependency-installation")
    cmd += ["--host", host, "--port", str(port)]
    return cmd


def supernode_command(superlink: str, node_config: Mapping[str, ConfigValue], *,
                      ca_cert: str | Path | None = None, auth_key: str | Path | None = None,
                      port: int = SUPERNODE_PORT, insecure: bool = False,
                      max_retries: int | None = None,
                      max_wait_time: float | None = None) -> list[str]:  # fmt: skip
    """The `flower-supernode` command line of one site: connects to `superlink`
    (`host:port`) over TLS checked against `ca_cert`, authenticated with the site's
    private key `auth_key` (its public key must be registered at the SuperLink).

    `node_config` reaches the ClientApp as `context.node_config`; fedtune reads
    `partition-id` (which site of the config's partition this node is) and
    `output-dir` (where a site keeps personalized models and indexes). The
    SuperNode's local Runtime API listens on 127.0.0.1:`port` (one port per
    SuperNode on a machine). `max_retries` / `max_wait_time` bound reconnection
    attempts (Flower's default: retry for ever)."""
    cmd = [flower_binary("flower-supernode"), "--superlink", superlink]
    if insecure:
        log.warning("SuperNode connects to %s without TLS and without authentication "
                    "(insecure)", superlink)  # fmt: skip
        cmd.append("--insecure")
    else:
        for what, p in (("root certificate (ca.crt)", ca_cert),
                        ("SuperNode authentication key", auth_key)):  # fmt: skip
            if p is None or not Path(p).is_file():
                raise ConfigError(f"a secure SuperNode needs its {what}: {p} is missing "
                                  "(`fedtune certs`); or pass insecure=True")  # fmt: skip
        cmd += ["--root-certificates", str(Path(str(ca_cert)).resolve()),
                "--auth-supernode-private-key", str(Path(str(auth_key)).resolve())]  # fmt: skip
    if node_config:
        cmd += ["--node-config", format_config(node_config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


# --- the flwr CLI ------------------------------------------------------------------


def flwr_cli(args: Sequence[str], flwr_home: str | Path, *, timeout: float = 60.0,
             env: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """Run `flwr ARGS` with `FLWR_HOME=flwr_home`; its stdout. Raises DeploymentError
    when it fails or runs longer than `timeout` seconds (it is then killed)."""
    cmd = [flower_binary("flwr"), *args]
    try:
        proc = subprocess.run(cmd, env=flower_env(flwr_home, env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        parts = (err.stdout, err.stderr)  # bytes even with text=True, or None
        text = "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p or ""
                       for p in parts)  # fmt: skip
        raise DeploymentError(f"`flwr {' '.join(args[:2])}` did not finish in {timeout:.0f} s; "
                              f"is the SuperLink up?{_quote(text[-3000:])}") from None  # fmt: skip
    if proc.returncode != 0:
        lines = _ANSI.sub("", proc.stdout + proc.stderr).splitlines()[-TAIL_LINES:]
        raise DeploymentError(f"`flwr {' '.join(args[:2])}` failed (exit {proc.returncode})"
                              f"{_quote(chr(10).join(lines))}")  # fmt: skip
    return proc.stdout


def _json_of(output: str, what: str) -> dict[str, Any]:
    start = output.find("{")
    try:
        data, _ = json.JSONDecoder().raw_decode(output[start:]) if start >= 0 else ({}, 0)
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict) or not data:
        raise DeploymentError(f"{what}: no JSON in the output of flwr{_quote(output[-2000:])}")
    if data.get("success") is False:
        raise DeploymentError(f"{what}: {data.get('error-message', data)}")
    return data


def register_site(flwr_home: str | Path, connection: str, public_key: str | Path, *,
                  name: str | None = None, timeout: float = 60.0) -> int:  # fmt: skip
    """Register a site's SuperNode public key at the SuperLink (`flwr supernode
    register`); returns the node id. Only registered keys may connect."""
    if not Path(public_key).is_file():
        raise ConfigError(f"public key {public_key} not found (`fedtune certs` writes "
                          "sites/<site>/auth.key.pub)")  # fmt: skip
    args = ["supernode", "register", str(Path(public_key).resolve()), connection,
            "--format", "json"]  # fmt: skip
    if name:
        args += ["--name", name]
    data = _json_of(flwr_cli(args, flwr_home, timeout=timeout), f"registering {public_key}")
    return int(data["node-id"])


def register_sites(flwr_home: str | Path, connection: str, certs: FederationCerts, *,
                   timeout: float = 60.0) -> dict[str, int | None]:  # fmt: skip
    """Register every site of `certs` (its sites/<name>/auth.key.pub); a site already
    registered (e.g. before a SuperLink restart) is kept. Site -> node id (None when
    it was registered before)."""
    out: dict[str, int | None] = {}
    for site in certs.sites:
        try:
            out[site] = register_site(flwr_home, connection, certs.site_public_key(site),
                                      name=site, timeout=timeout)  # fmt: skip
        except DeploymentError as err:
            if "already in use" not in str(err):
                raise
            out[site] = None
    return out


def list_nodes(flwr_home: str | Path, connection: str, *,
               timeout: float = 60.0) -> list[dict[str, Any]]:  # fmt: skip
    """The SuperLink's SuperNodes (`flwr supernode list`): dicts with `node-id`,
    `owner-name`, `status` (`registered`, `online`, `offline`), times."""
    out = flwr_cli(["supernode", "list", connection, "--format", "json"], flwr_home,
                   timeout=timeout)  # fmt: skip
    return list(_json_of(out, "listing SuperNodes").get("nodes", []))


def run_status(flwr_home: str | Path, connection: str, run_id: int, *,
               timeout: float = 60.0) -> str:  # fmt: skip
    """A run's status: `pending`, `starting`, `running`, `finished:completed`,
    `finished:failed` or `finished:stopped`."""
    out = flwr_cli(["ls", connection, "--run-id", str(run_id), "--format", "json"], flwr_home,
                   timeout=timeout)  # fmt: skip
    runs = _json_of(out, f"status of run {run_id}").get("runs", [])
    if not runs:
        raise DeploymentError(f"the SuperLink knows no run {run_id}")
    return str(runs[0]["status"])


def wait_for_run(flwr_home: str | Path, connection: str, run_id: int, *,
                 timeout: float = 3600.0, poll: float = 2.0) -> str:  # fmt: skip
    """Poll until run `run_id` has finished; its final status. Raises
    DeploymentError after `timeout` seconds (the run keeps going: `flwr stop`)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(flwr_home, connection, run_id)
        if status.startswith("finished"):
            return status
        if time.monotonic() + poll > deadline:
            raise DeploymentError(f"run {run_id} still {status} after {timeout:.0f} s; stop "
                                  f"it with `flwr stop {run_id} {connection}`")  # fmt: skip
        time.sleep(poll)


@dataclass(frozen=True)
class FlowerRun:
    """A run submitted to a SuperLink."""

    run_id: int
    status: str
    """As `run_status`; `finished:completed` when it succeeded."""
    seconds: float
    """From submission until `flwr run` returned (with `stream`: the whole run)."""
    log: Path | None
    """The output of `flwr run` (with `stream`: the ServerApp's log)."""

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def submit(app_dir: str | Path, connection: str, flwr_home: str | Path,
           run_config: Mapping[str, ConfigValue] | None = None, *, stream: bool = True,
           timeout: float = 3600.0, log_file: str | Path | None = None,
           env: Mapping[str, str] | None = None, check: bool = True) -> FlowerRun:  # fmt: skip
    """`flwr run app_dir connection` with `run_config` overrides (keys of the app's
    `[tool.flwr.app.config]`). With `stream`, waits for the run to finish (at most
    `timeout` seconds, then stops it), writing the ServerApp's log to `log_file`;
    without, returns once submitted (see `wait_for_run`). With `check`, a run that
    did not complete raises DeploymentError quoting the log.

    `flwr run` packs `app_dir` into a FAB: it walks the whole folder (a virtual
    environment inside costs seconds; only *.py/*.toml/*.md/... outside
    .gitignore'd and built-in excluded paths are packed, at most 10 MB)."""
    app = Path(app_dir).resolve()
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} is not a Flower app (no pyproject.toml)")
    home = Path(flwr_home)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = Path(log_file) if log_file else home / "logs" / f"run-{stamp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = ["run", str(app), connection]
    for key, value in (run_config or {}).items():
        args += ["--run-config", format_config({key: value})]
    if stream:
        args.append("--stream")
    t0 = time.perf_counter()
    with log_path.open("ab") as out:
        proc = subprocess.Popen([flower_binary("flwr"), *args], env=flower_env(home, env),
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    seconds = time.perf_counter() - t0
    text = _ANSI.sub("", log_path.read_text(encoding="utf-8", errors="replace"))
    ids = _RUN_ID.findall(text)
    if not ids:
        why = "did not finish in time" if rc is None else f"exit {rc}"
        raise DeploymentError(f"`flwr run` submitted no run ({why}); log {log_path}:"
                              f"{_quote(log_tail(log_path))}")  # fmt: skip
    run_id = int(ids[-1])
    if rc is None:
        try:
            flwr_cli(["stop", str(run_id), connection], home)
            stopped = "stopped it"
        except DeploymentError as err:
            stopped = f"could not stop it ({err})"
        raise DeploymentError(
            f"run {run_id} did not finish in {timeout:.0f} s; {stopped}. "
            f"Log {log_path}:{_quote(log_tail(log_path))}"
        )
    status = run_status(home, connection, run_id)
    if stream and not status.startswith("finished"):  # the log stream ended early
        status = wait_for_run(home, connection, run_id, timeout=max(1.0, timeout - seconds))
    run = FlowerRun(run_id, status, seconds, log_path)
    if check and stream and not run.completed:
        raise DeploymentError(f"run {run_id} ended {status}; log {log_path}:"
                              f"{_quote(log_tail(log_path))}")  # fmt: skip
    return run


# --- the fedtune app ------------------------------------------------------------------


def find_app_dir() -> Path:
    """The fedtune Flower app: the project folder (pyproject.toml with
    `[tool.flwr.app]`) of this fedtune, when it is installed from a source checkout."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        data = {}
    if "app" not in data.get("tool", {}).get("flwr", {}):
        raise ConfigError(
            f"fedtune at {root} is not a source checkout with pyproject.toml's "
            "[tool.flwr.app]; run `flwr run` from a clone of the project"
        )
    return root


def app_bundle(dest: str | Path) -> Path:
    """A minimal Flower app folder for `flwr run` (pyproject.toml naming fedtune's
    ServerApp and ClientApp): enough to submit a run when fedtune is installed from
    a wheel, and packed at once. With runtime dependency installation off (fedtune's
    default), every party imports the fedtune installed in its environment; the
    bundle only names the apps."""
    import fedtune

    src = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        flwr_app = tomllib.loads(src.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):  # a wheel install: the same tables
        components = {"serverapp": "fedtune.federated.apps:server_app",
                      "clientapp": "fedtune.federated.apps:client_app"}  # fmt: skip
        config = dict.fromkeys(("fedtune-config", "config", "set", "output-dir", "resume"), "")
        flwr_app = {"publisher": "fedtune", "components": components, "config": config}
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    project = {"project": {"name": "fedtune", "version": fedtune.__version__,
                           "dependencies": [f"fedtune=={fedtune.__version__}"]},
               "tool": {"flwr": {"app": flwr_app}}}  # fmt: skip
    (out / "pyproject.toml").write_text(_dump_toml(project), encoding="utf-8")
    return out


def stage_app(project: str | Path, dest: str | Path) -> Path:
    """A copy of the Flower app in `project` holding only what the app bundle needs
    (pyproject.toml, README.md, .gitignore, LICENSE and src/**/*.py), in `dest`
    (replaced). `flwr run` walks every file under the folder it packs, a virtual
    environment and run outputs included (seconds for a project folder with a
    .venv), before filtering; a staged copy packs in a fraction of a second."""
    src, out = Path(project).resolve(), Path(dest)
    if not (src / "pyproject.toml").is_file():
        raise ConfigError(f"{src} is not a Flower app (no pyproject.toml)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", ".gitignore", "LICENSE"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for path in (src / "src").rglob("*.py"):
        if "__pycache__" not in path.parts:
            target = out / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return out


def fedtune_run_config(config: str | Path | None = None, output_dir: str | Path | None = None,
                       overrides: Sequence[str] = (),
                       resume: str | Path | None = None) -> dict[str, ConfigValue]:  # fmt: skip
    """The run config of the fedtune app: a TOML config and `output-dir` as absolute
    paths (the ServerApp runs in Flower's own folder) and `--set` style overrides."""
    rc: dict[str, ConfigValue] = {}
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} not found")
        rc["config"] = str(Path(config).resolve())
    if overrides:
        bad = [o for o in overrides if ";" in o or "=" not in o]
        if bad:
            raise ConfigError(f"overrides are key=value without ';': {bad}")
        rc["set"] = ";".join(overrides)
    if output_dir is not None:
        rc["output-dir"] = str(Path(output_dir).resolve())
    if resume is not None:
        rc["resume"] = str(Path(resume).resolve())
    return rc


# --- processes -----------------------------------------------------------------------


@dataclass
class FlowerProcess:
    """A SuperLink or SuperNode this module started (in a session of its own, so
    that it and the app processes it starts are stopped together)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    node_id: int | None = None

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        return log_tail(self.log, lines)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to its process group (graceful: a SuperNode signs off, so that it
        may reconnect at once), SIGKILL after `timeout` s; its exit code."""
        return _stop_group(self.popen, timeout)


def _signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(popen: subprocess.Popen[bytes], timeout: float) -> int | None:
    pid = popen.pid
    if popen.poll() is None:
        _signal_group(pid, signal.SIGTERM)
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("process %d did not stop in %.0f s after SIGTERM; killing it", pid, timeout)
        _signal_group(pid, signal.SIGKILL)
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("process %d survived SIGKILL", pid)
    # Children (SuperExec, app processes) may outlive the leader: same treatment.
    deadline = time.monotonic() + timeout
    if _signal_group(pid, signal.SIGTERM):
        while time.monotonic() < deadline and _signal_group(pid, 0):
            time.sleep(0.1)
        _signal_group(pid, signal.SIGKILL)
    return popen.returncode


def _start(cmd: list[str], name: str, log_path: Path, env: Mapping[str, str],
           cwd: Path, port: int) -> FlowerProcess:  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                 start_new_session=True)  # fmt: skip
    return FlowerProcess(name, popen, log_path, port)


def is_listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on `host` (a wildcard address: this
    machine's loopback) and `port`."""
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((connect_host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_listening(proc: FlowerProcess, host: str, deadline: float) -> None:
    while True:
        if not proc.running:
            raise DeploymentError(f"{proc.name} exited (code {proc.popen.returncode}) before "
                                  f"listening on port {proc.port}; {proc.log}:"
                                  f"{_quote(proc.tail())}")  # fmt: skip
        if is_listening(host, proc.port):
            return
        if time.monotonic() > deadline:
            raise DeploymentError(f"{proc.name} is not listening on port {proc.port} after "
                                  f"waiting; {proc.log}:{_quote(proc.tail())}")  # fmt: skip
        time.sleep(0.1)


def _wait_connected(proc: FlowerProcess, deadline: float) -> int:
    while True:
        match = _NODE_ID.search(proc.log.read_bytes().decode("utf-8", "replace"))
        if match:
            proc.node_id = int(match.group(1))
            return proc.node_id
        if not proc.running:
            raise DeploymentError(f"{proc.name} exited (code {proc.popen.returncode}) before "
                                  f"connecting to the SuperLink; {proc.log}:"
                                  f"{_quote(proc.tail())}")  # fmt: skip
        if time.monotonic() > deadline:
            raise DeploymentError(f"{proc.name} did not connect to the SuperLink in time; "
                                  f"{proc.log}:{_quote(proc.tail())}")  # fmt: skip
        time.sleep(0.1)


@dataclass(eq=False)
class LocalFederation:
    """A SuperLink and one SuperNode per site on this machine, as subprocesses:

        certs = make_certs(tmp / "certs", ["a", "b", "c"])
        with LocalFederation(tmp / "fed", ["a", "b", "c"], certs) as fed:
            run = fed.submit(find_app_dir(), fedtune_run_config(config, tmp / "out"))

    Site i gets node config `partition-id=i num-partitions=N` (plus
    `node_config[site]`). Layout of `root`: `logs/` (superlink.log,
    supernode-<site>.log, run logs), `superlink/` (state.db), `sites/<site>/`
    (each node's FLWR_HOME), `cli/` (the `flwr` CLI's FLWR_HOME with the
    connection `connection`). Every wait is bounded by `start_timeout`; on exit
    SuperNodes, then the SuperLink, get SIGTERM, then SIGKILL after `stop_timeout`.
    """

    root: Path
    sites: Sequence[str]
    certs: FederationCerts | None = None
    insecure: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    """The SuperLink's port; 0 = a free one."""
    node_config: Mapping[str, Mapping[str, ConfigValue]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of every process (e.g. HF_HUB_OFFLINE, FEDTUNE_CACHE_DIR)."""
    connection: str = "fedtune-local"
    start_timeout: float = 120.0
    stop_timeout: float = 10.0
    task_poll_interval: float | None = None
    """Seconds between the SuperExecs' polls for app processes to start (Flower's
    default is 1 s)."""
    warm: bool = True
    """Each site runs a long-lived worker that runs its ClientApp in one process, the
    base model loaded once (`fedtune.federated.worker`), and a SuperNode polling
    every `node_poll_interval` s; False: Flower's own process per message, 3 s poll."""
    node_poll_interval: float = 0.25
    superlink: FlowerProcess | None = field(default=None, init=False)
    nodes: dict[str, FlowerProcess] = field(default_factory=dict, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    """Seconds `start` took (SuperLink up, keys registered, every node connected)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if not self.insecure and self.certs is None:
            raise ConfigError("LocalFederation needs certs (fedtune.certs.make_certs), or "
                              "insecure=True")  # fmt: skip
        if len(set(self.sites)) != len(self.sites) or not self.sites:
            raise ConfigError(f"sites must be distinct names, at least one: {list(self.sites)}")

    # paths
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the `flwr` CLI (holds config.toml with `connection`)."""
        return self.root / "cli"

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    def _extra_env(self) -> dict[str, str]:
        extra = dict(self.env)
        if self.task_poll_interval is not None:
            extra[TASK_POLL_ENV] = str(self.task_poll_interval)
        return extra

    def _env(self, home: Path) -> dict[str, str]:
        return flower_env(home, self._extra_env())

    # lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()

    def start(self) -> Self:
        """Start the SuperLink, register every site's key, start the SuperNodes and
        wait until all are connected (at most `start_timeout` s in all)."""
        if self.superlink is not None:
            raise DeploymentError("this federation is already started")
        for name in ("flower-superlink", "flower-supernode", "flwr"):
            flower_binary(name)
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.start_timeout
        atexit.register(self.stop)
        try:
            self.port = self.port or free_port(self.host)
            check_port_free(self.host, self.port)
            self._start_superlink(deadline)
            write_connection(self.cli_home, self.connection, self.address,
                             self.certs.ca_cert if self.certs else None,
                             insecure=self.insecure)  # fmt: skip
            n = len(self.sites)
            with ThreadPoolExecutor(max_workers=n) as pool:
                if not self.insecure:
                    list(pool.map(self.register, self.sites))
                for i, site in enumerate(self.sites):
                    defaults = {"partition-id": i, "num-partitions": n}
                    self.add_node(site, {**defaults, **self.node_config.get(site, {})},
                                  wait=False)  # fmt: skip
                list(pool.map(lambda s: _wait_connected(self.nodes[s], deadline), self.sites))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - t0
        log.info("federation up in %.1f s: SuperLink %s, %d SuperNodes", self.startup_seconds,
                 self.address, len(self.sites))  # fmt: skip
        return self

    def register(self, site: str) -> int:
        """Register `site`'s public key at the SuperLink; its node id."""
        assert self.certs is not None
        remaining = max(1.0, self.start_timeout)
        return register_site(self.cli_home, self.connection, self.certs.site_public_key(site),
                             name=site, timeout=remaining)  # fmt: skip

    def add_node(self, site: str, node_config: Mapping[str, ConfigValue] | None = None, *,
                 wait: bool = True, timeout: float | None = None) -> FlowerProcess:  # fmt: skip
        """Start a SuperNode for `site` (its key must be registered to be let in).
        With `wait`, return once it is connected; raise DeploymentError if it exits
        first (e.g. 'Failed to activate' for an unregistered key) or takes longer
        than `timeout` (default `start_timeout`) seconds."""
        if self.superlink is None or not self.superlink.running:
            raise DeploymentError("start the federation (SuperLink) before adding nodes")
        if site in self.nodes and self.nodes[site].running:
            raise DeploymentError(f"site {site!r} already has a running SuperNode")
        config = {**self.node_config.get(site, {}), **(node_config or {})}
        port = free_port("127.0.0.1")
        home = self.root / "sites" / site
        cmd = supernode_command(
            _address("127.0.0.1" if self.host in ("0.0.0.0", "") else self.host, self.port),
            config, port=port, insecure=self.insecure,
            ca_cert=self.certs.ca_cert if self.certs else None,
            auth_key=self.certs.site_key(site) if self.certs else None,
        )  # fmt: skip
        if self.warm:
            cmd = [sys.executable, "-m", "fedtune.federated.worker",
                   "--poll", str(self.node_poll_interval), "--", *cmd]  # fmt: skip
        proc = _start(cmd, f"SuperNode {site}", self.logs / f"supernode-{site}.log",
                      self._env(home), home, port)  # fmt: skip
        self.nodes[site] = proc
        if wait:
            _wait_connected(proc, time.monotonic() + (timeout or self.start_timeout))
        return proc

    def kill(self, site: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to `site`'s SuperNode and everything it started (a crash with
        SIGKILL: the SuperLink notices only when its heartbeats stop, within 60 s)."""
        proc = self.nodes[site]
        _signal_group(proc.popen.pid, sig)
        try:
            proc.popen.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"SuperNode {site} survived signal {sig}") from err

    def restart_superlink(self, kill: bool = True) -> None:
        """Stop the SuperLink (SIGKILL with `kill`: a crash; else SIGTERM) and start it
        again on the same port and state database. The SuperNodes reconnect by
        themselves; runs in flight when it stopped are marked failed."""
        if self.superlink is None:
            raise DeploymentError("the federation is not started")
        if kill:
            _signal_group(self.superlink.popen.pid, signal.SIGKILL)
            self.superlink.popen.wait(timeout=self.stop_timeout)
        self.superlink.stop(self.stop_timeout)
        deadline = time.monotonic() + self.start_timeout
        while True:  # the port may linger for a moment after a kill
            try:
                check_port_free(self.host, self.port)
                break
            except DeploymentError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._start_superlink(deadline)

    def _start_superlink(self, deadline: float) -> None:
        """Start the SuperLink on `port` with its state in root/superlink; wait until it
        listens (until `deadline`, time.monotonic())."""
        state = self.root / "superlink"
        cmd = superlink_command(self.certs, self.port, state, host=self.host,
                                insecure=self.insecure)  # fmt: skip
        self.superlink = _start(cmd, "SuperLink", self.logs / "superlink.log",
                                self._env(state / "home"), state, self.port)  # fmt: skip
        _wait_listening(self.superlink, self.host, deadline)

    def wait_online(self, sites: Sequence[str] | None = None, timeout: float | None = None) -> None:
        """Wait (bounded) until the SuperLink lists `sites` (default: all running) online."""
        names = sites or [s for s, p in self.nodes.items() if p.running]
        want = {int(self.nodes[s].node_id or 0) for s in names}
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            try:
                online = {int(n["node-id"]) for n in self.list_nodes() if n["status"] == "online"}
            except DeploymentError:
                online = set()
            if want <= online:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"sites not online after waiting: node ids "
                                      f"{sorted(want - online)}")  # fmt: skip
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to every SuperNode, then to the SuperLink; SIGKILL what is left
        after `stop_timeout` s. Idempotent."""
        atexit.unregister(self.stop)
        nodes = list(self.nodes.values())
        if nodes:
            with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
                list(pool.map(lambda p: p.stop(self.stop_timeout), nodes))
        if self.superlink is not None:
            self.superlink.stop(self.stop_timeout)

    # using it
    def submit(self, app_dir: str | Path, run_config: Mapping[str, ConfigValue] | None = None,
               *, timeout: float = 3600.0, check: bool = True) -> FlowerRun:  # fmt: skip
        """`submit` to this federation, streaming the ServerApp's log to
        logs/run-<n>.log; returns when the run has finished."""
        n = len(list(self.logs.glob("run-*.log")))
        return submit(app_dir, self.connection, self.cli_home, run_config, timeout=timeout,
                      log_file=self.logs / f"run-{n}.log", env=self._extra_env(),
                      check=check)  # fmt: skip

    def list_nodes(self) -> list[dict[str, Any]]:
        return list_nodes(self.cli_home, self.connection)
