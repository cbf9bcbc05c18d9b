"""`fedtune models serve NAME`: a decoder behind an OpenAI-compatible endpoint.

fedtune's remote backends (`icl` with `method.backend = "remote"`, `fedtune ask
--base-url`) talk to any chat-completions server. Two servers from PyPI run the
catalog's decoders; fedtune builds their command lines and checks they are there,
the servers themselves are theirs:

- `transformers`: `transformers serve` (Hugging Face transformers' own FastAPI server)
  on the plain folder fedtune converts the GGUF file to, the same weights the local
  backend scores. transformers is a fedtune dependency already; the server's extras
  are pure Python (`pip install 'transformers[serving]'`: seconds).
- `llama-cpp`: llama-cpp-python's server (`python -m llama_cpp.server`), which runs
  the quantized file as it is, in C++. PyPI carries it as a source distribution only
  and building llama.cpp takes minutes to an hour on 2 cores, so it is installed on
  request (docs/models.md), here or in another environment (`--python`).

`auto` picks llama-cpp where it is installed, else transformers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.errors import ModelError

LLAMA_CPP_VERSION = "0.3.36"
"""The llama-cpp-python release this was tested with (docs/benchmarks.md)."""
INSTALL = f"pip install 'llama-cpp-python[server]=={LLAMA_CPP_VERSION}'"

SERVERS: tuple[str, ...] = ("auto", "llama-cpp", "transformers")
"""`--server` values; `auto` = llama-cpp where installed, else transformers."""


def transformers_install() -> str:
    """The command that adds `transformers serve`'s extras at fedtune's transformers."""
    from importlib.metadata import version

    return f"pip install 'transformers[serving]=={version('transformers')}'"


@dataclass(frozen=True)
class ServerCommand:
    """A server's command line, the folder to start it in and its extra environment."""

    argv: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def gguf_of(model: str) -> tuple[Path, str]:
    """(GGUF file, the model name the server announces) of a catalog decoder or a
    .gguf path."""
    from fedtune.catalog import CATALOG, gguf_file

    if model in CATALOG:
        return gguf_file(model), model
    path = Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelError(
            f"{model!r} is neither a catalog decoder (smollm2, gemma3) nor an existing "
            ".gguf file; pass one of those"
        )
    return path, path.stem


def llama_cpp_command(
    python: str, gguf: Path, alias: str, host: str, port: int, context: int, threads: int
) -> ServerCommand:
    """llama-cpp-python's server on the quantized file, announced as `alias`."""
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", host, "--port", str(port), "--n_ctx", str(context)]  # fmt: skip
    if threads:
        cmd += ["--n_threads", str(threads)]
    return ServerCommand(cmd)


def _imports(python: str, code: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", code], capture_output=True, timeout=120)
        return probe.returncode == 0
    except subprocess.TimeoutExpired:  # an import that hangs cannot serve either
        return False
    except OSError as e:
        raise ModelError(f"--python {python} cannot be run ({e}); pass a Python executable") from e


_TRANSFORMERS_PROBE = (
    "from transformers.utils.import_utils import is_serve_available as a; assert a()"
)


def choose_server(server: str, python: str) -> str:
    """`llama-cpp` or `transformers`: the one asked for, checked to be installed in
    `python`; `auto` = llama-cpp where installed, else transformers. Refuses, naming
    the install command, when the server cannot run."""
    if server not in SERVERS:
        raise ModelError(f"--server {server!r} is not one of {', '.join(SERVERS)}")
    if server in ("auto", "llama-cpp") and _imports(python, "import llama_cpp.server.app"):
        return "llama-cpp"
    if server == "llama-cpp":
        check_server_installed(python)  # raises, naming the install
    if _imports(python, _TRANSFORMERS_PROBE):
        return "transformers"
    here = "this environment" if python == sys.executable else python
    other = f"; or `{INSTALL}` for llama.cpp's server" if server == "auto" else ""
    raise ModelError(
        f"transformers' server (`transformers serve`) lacks its extras in {here}: run "
        f"`{transformers_install()}` there (pure Python, seconds){other}"
    )


BATCHING_PAGES = 64
"""KV-cache pages (256 tokens each) of `transformers serve --continuous-batching`."""


def transformers_command(
    python: str, gguf: Path, alias: str, host: str, port: int, threads: int,
    batching: bool = False,
) -> ServerCommand:  # fmt: skip
    """`transformers serve` on the plain folder of `gguf` (converted once, cached),
    announced as `alias`: the server names a local model by the path it was given, so
    it starts in a folder of the cache where `alias` links to the model folder. Never
    online: the Hub is off and the CLI's update check skipped. `batching`: its
    continuous batching, which decodes the requests in flight together (without it the
    server answers one at a time)."""
    from fedtune.catalog import gguf_folder

    folder = gguf_folder(gguf)  # <cache>/gguf/<sha>
    where = folder.parent.parent / "serve" / folder.name
    where.mkdir(parents=True, exist_ok=True)
    link = where / alias
    if link.is_symlink() and link.resolve() != folder.resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(folder, target_is_directory=True)
    argv = [python, "-m", "transformers.cli.transformers", "serve", alias, "--host", host,
            "--port", str(port)]  # fmt: skip
    if batching:
        # A bounded KV cache: left to itself the server sizes it from free memory (a
        # GPU's; on a CPU it took 14 GB of 24 for SmolLM2). 64 pages of 256 tokens hold
        # 8 requests of 2,048 tokens at once: 0.8 GB for SmolLM2 (docs/models.md).
        argv += ["--continuous-batching", "--cb-num-blocks", str(BATCHING_PAGES)]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return ServerCommand(argv, where, env)


def server_command(
    server: str, python: str, gguf: Path, alias: str, host: str, port: int, context: int,
    threads: int, batching: bool = False,
) -> ServerCommand:  # fmt: skip
    """The command of `server` (`llama-cpp` or `transformers`, from `choose_server`);
    `batching` (transformers only) turns on continuous batching."""
    if server == "llama-cpp":
        if batching:
            raise ModelError(
                "--batching is transformers' continuous batching; llama-cpp-python's server "
                "answers one request at a time: pass --server transformers, or drop --batching"
            )
        return llama_cpp_command(python, gguf, alias, host, port, context, threads)
    return transformers_command(python, gguf, alias, host, port, threads, batching)


def check_server_installed(python: str) -> None:
    """Refuse, naming the install command, when `python` cannot import llama-cpp-python's
    server."""
    if not _imports(python, "import llama_cpp.server.app"):
        here = "this environment" if python == sys.executable else python
        raise ModelError(
            f"llama-cpp-python's server is not installed in {here}: run `{INSTALL}` there "
            "(it builds llama.cpp from source: 84 min measured on 2 busy CPU cores), or pass "
            "--python of an environment that has it"
        )
