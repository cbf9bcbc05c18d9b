"""`fedtune models serve NAME`: a GGUF decoder behind an OpenAI-compatible endpoint.

fedtune's remote backends (`icl` with `method.backend = "remote"`, `fedtune ask
--base-url`) talk to any chat-completions server. For the catalog's GGUF decoders
the server is llama-cpp-python's (`python -m llama_cpp.server`, from PyPI), which
runs the quantized file as it is. It is not one of fedtune's dependencies: PyPI
carries it as a source distribution only, and building llama.cpp takes minutes, so
it is installed on request (docs/models.md), here or in another environment
(`--python`). This module builds its command line and checks that it is there; the
server itself is llama-cpp-python's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedtune.errors import ModelError

LLAMA_CPP_VERSION = "0.3.36"
"""The llama-cpp-python release this was tested with (docs/benchmarks.md)."""
INSTALL = f"pip install 'llama-cpp-python[server]=={LLAMA_CPP_VERSION}'"


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


def server_command(
    python: str, gguf: Path, alias: str, host: str, port: int, context: int, threads: int
) -> list[str]:
    """The llama-cpp-python server's command line."""
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", host, "--port", str(port), "--n_ctx", str(context)]  # fmt: skip
    if threads:
        cmd += ["--n_threads", str(threads)]
    return cmd


def check_server_installed(python: str) -> None:
    """Refuse, naming the install command, when `python` cannot import the server."""
    probe = [python, "-c", "import llama_cpp.server.app"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=120).returncode == 0
    except OSError as e:
        raise ModelError(f"--python {python} cannot be run ({e}); pass a Python executable") from e
    if not ok:
        here = "this environment" if python == sys.executable else python
        raise ModelError(
            f"llama-cpp-python's server is not installed in {here}: run `{INSTALL}` there "
            "(it builds llama.cpp from source, about 20 minutes on 2 CPU cores), or pass "
            "--python of an environment that has it"
        )
