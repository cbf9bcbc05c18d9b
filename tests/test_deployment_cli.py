"""`fedtune server`, `fedtune site` and `fedtune submit` as a user runs them: separate
processes on loopback, TLS and site authentication from `fedtune certs`, each site
with its own data file. Slow (~1 min): `scripts/test -m slow`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import LABELS, TEXTS, Y

from fedtune.deploy import free_port

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.slow,
]


def _fedtune(*args: str, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not in {log}"
        time.sleep(0.2)


def test_server_sites_and_submit_from_the_command_line(tiny_models: dict[str, str],
                                                       tmp_path: Path) -> None:  # fmt: skip
    sites = ["org-a", "org-b"]
    # A certificate for the server's public name, as docs/deployment.md says; `fedtune
    # server` still registers the sites over loopback.
    subprocess.run([sys.executable, "-m", "fedtune.cli", "certs", "certs", "--host",
                    "fl.example.org", "--site", sites[0], "--site", sites[1]], cwd=tmp_path,
                   check=True, capture_output=True)  # fmt: skip
    for i, site in enumerate(sites):
        rows = [{"text": f"{TEXTS[j % 6]} {j} {site}", "label": LABELS[Y[j % 6]]}
                for j in range(i, 60, 2)]  # fmt: skip
        pd.DataFrame(rows).to_csv(tmp_path / f"{site}.csv", index=False)
    server_rows = [{"text": f"{TEXTS[j % 6]} {j}", "label": LABELS[Y[j % 6]]} for j in range(60)]
    pd.DataFrame(server_rows).to_csv(tmp_path / "server.csv", index=False)
    config = tmp_path / "run.toml"
    config.write_text(f"""name = "cli"
[data]
source = "file"
path = {json.dumps(str(tmp_path / "server.csv"))}
labels = {json.dumps(list(LABELS))}
[model]
name = {json.dumps(tiny_models["bert"])}
[method]
name = "lora"
[train]
progress = false
batch_size = 8
[federated]
sites = 2
rounds = 2
partition = "own"
""")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server_log = tmp_path / "server.log"
        server = _fedtune("server", "certs", "--port", str(port), log=server_log, cwd=tmp_path)
        procs.append(server)
        _wait_for(server_log, "SuperLink up", server)
        assert "site org-a: registered" in server_log.read_text()
        for site in sites:
            log = tmp_path / f"{site}.log"
            procs.append(_fedtune("site", f"certs/sites/{site}", "--server", f"127.0.0.1:{port}",
                                  "--data", f"{site}.csv", "--workdir", f"work-{site}",
                                  "--port", str(free_port()), log=log, cwd=tmp_path))  # fmt: skip
        for site, proc in zip(sites, procs[1:], strict=True):
            _wait_for(tmp_path / f"{site}.log", "SuperNode ID", proc)
        out = tmp_path / "run"
        # The config travels with the run: the submitter's copy is the only one.
        (tmp_path / "laptop").mkdir()
        config = config.rename(tmp_path / "laptop" / "run.toml")
        submit = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "submit", str(config), "--server",
             f"127.0.0.1:{port}", "--ca", "certs/ca/ca.crt", "--output-dir", str(out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "round   2/2" in submit.stdout and "finished:completed" in submit.stdout
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["sites"] == sites and rows[-1]["n_train"] == 60
        # Each site's worker kept the model: one load, one message handled per round.
        for site in sites:
            log = (tmp_path / f"{site}.log").read_text(errors="replace")
            assert log.count("train handled") == 2
    finally:
        for p in reversed(procs):  # SIGTERM: each stops what it started
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    assert all(p.returncode is not None for p in procs)
