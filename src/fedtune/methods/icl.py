"""In-context learning (`icl`): zero/few-shot prompting of a frozen causal LM.

Nothing is trained. A prompt is the instruction, a few labelled training
examples (the demonstrations) and the query, joined by a separator:

    Classify the sentiment of the financial news sentence as negative, neutral, positive.

    Sentence: Operating profit fell to EUR 1.2 mn.
    Sentiment: negative

    Sentence: The company opened a new office.
    Sentiment:

Demonstrations are drawn at random (seeded per query, balanced over the labels
by default) or are the training examples nearest to the query by embedding
(`selection = "similar"`, a LanceDB index of the training pool). A query never
gets itself as a demonstration.

Two backends:
- `local`: the causal LM is loaded with transformers and every label word's
  likelihood after the prompt is scored (fedtune.classify.GenerativeClassifier),
  so the prediction is always a valid label;
- `remote`: an OpenAI-compatible chat-completions endpoint answers in free text
  (fedtune.remote); answers naming no label are counted as unparseable. Where the
  server returns log-probabilities (`remote_scoring = "logprobs"`), the first answer
  token's top log-probabilities score the label words instead, and calibration works
  as it does locally.

Prompt templates are data (config fields); `variants` names a TOML file of
alternative templates among which fit() keeps the best on the validation set
(hard prompt tuning). Prompts longer than the context budget lose their
demonstrations (last first), then the end of the query text; the run's notes
say how many.

Federated, by query (fedtune.federated.query): a site's demonstrations are its
own texts, so they never leave it; the server sends each query's text to every
site, each site prompts the LM with demonstrations from its own examples and
returns its label probabilities, and the server averages them (an ensemble of the
sites' prompts). Zero-shot with the uniform prior it equals the centralized run (no
site data is used); `prior = "train"` aims each site at its own label frequencies,
which its answers then reveal. The remote backend is refused there: a site would send
its demonstrations to the endpoint the run's config names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedtune.classify import GenerativeClassifier, to_device
from fedtune.config import MethodConfig
from fedtune.data import Example
from fedtune.embed import Embedder
from fedtune.errors import ConfigError, ModelError
from fedtune.methods import register
from fedtune.methods.frozen import FrozenMethod, Payload, QueryFederated, log_normalize
from fedtune.progress import count_bar
from fedtune.vectorstore import VectorStore

PROMPT_FILE = "prompt.json"
DEMOS_FILE = "demonstrations.jsonl"
INDEX_DIR = "demos"
MAX_POSITIONS = 2048
"""Cap of the default local context budget (long-context models need not use it all)."""
PROGRESS_MIN = 16
"""Remote: show a progress bar from this many requests on."""
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_NO_LIMIT = 1 << 60
Renderer = Callable[[list[tuple[str, str]], str], str]
"""(demonstration pairs, query text) -> the prompt."""


@dataclass(frozen=True)
class IclConfig(MethodConfig):
    """Zero/few-shot prompting of a causal LM (local or OpenAI-compatible)."""

    lr: float = 0.0
    """Unused (nothing is trained)."""
    model: str = ""
    """The causal LM (Hub id or local directory) of the local backend; default:
    `model.name`."""
    backend: Literal["local", "remote"] = "local"
    """`local`: load the LM and score each label word's likelihood (always a valid
    label); `remote`: ask an OpenAI-compatible chat-completions endpoint."""
    shots: int = 4
    """Demonstrations per prompt (0 = zero-shot)."""
    selection: Literal["random", "similar"] = "random"
    """`random`: drawn from the training set, seeded per query; `similar`: the
    training examples nearest to the query by `embedder` embedding, nearest first."""
    balanced: bool = True
    """random: take the labels in turn (round-robin) so each appears about equally."""
    embedder: str = "minilm"
    """similar: the embedding model (Hub id, directory or `minilm`)."""
    instruction: str = "Classify the sentiment of the financial news sentence as {labels}."
    """First paragraph of the prompt; `{labels}` becomes the comma-joined label
    words. Empty: no instruction."""
    demo_template: str = "Sentence: {text}\nSentiment: {label}"
    """One demonstration; needs `{text}` and `{label}` (the label word)."""
    query_template: str = "Sentence: {text}\nSentiment:"
    """The query; needs `{text}` once. The label word is scored right after it."""
    separator: str = "\n\n"
    """Between the instruction, the demonstrations and the query."""
    variants: str = ""
    """Optional TOML file of `[[variant]]` tables (a `name` and any of instruction,
    demo_template, query_template, separator; the rest as configured): fit() keeps
    the variant with the best validation accuracy."""
    select_on: int = 200
    """variants: validation examples (a stratified, seeded subset) to compare them on."""
    max_context: int = 0
    """Token budget of a prompt plus its answer; longer prompts drop demonstrations
    (last first; remote generation cuts each to `model.max_length` first), then the
    end of the query text. 0 = local: the model's maximum
    positions, at most 2048; remote: no limit. Remote counts tokens with
    `method.model`'s tokenizer when set, else estimates 4 characters per token."""
    base_url: str = ""
    """remote: e.g. http://127.0.0.1:8000/v1; default: $OPENAI_BASE_URL."""
    api_model: str = ""
    """remote: the model name the server serves."""
    api_key_env: str = "OPENAI_API_KEY"
    """remote: environment variable holding the API key (unset: no key is sent)."""
    timeout: float = 30.0
    """remote: seconds per request."""
    retries: int = 3
    """remote: extra attempts after a transient failure (timeout, 429, 5xx)."""
    concurrency: int = 1
    """remote: requests in flight at once. A server that batches them (vLLM, llama.cpp's
    `llama-server --parallel N`, `fedtune models serve --batching`, a hosted API)
    answers them together: 1.7x the answers a second at 4 on 2 CPU cores
    (docs/benchmarks.md). One that answers one at a time queues them, and a queued
    request's wait counts against `timeout`: keep 1 there."""
    max_tokens: int = 16
    """remote: answer length limit. A small chat model often answers a full sentence
    ("The sentiment of ... is Negative."): at 8 tokens 55% of SmolLM2's zero-shot
    answers named no label, at 16 tokens 17% (docs/benchmarks.md); with demonstrations
    it answers with the label word and stops."""
    remote_scoring: Literal["text", "logprobs"] = "text"
    """remote: how an answer becomes label scores. `text`: the answer (up to
    `max_tokens`) is parsed for a label word; `logprobs`: one token is generated and
    the server's `top_logprobs` for it score each label word by the tokens that begin
    it (fedtune.remote.label_logprobs), as the local backend scores label words; this
    also allows `calibrate`. Needs a server that returns log-probabilities (OpenAI,
    vLLM, llama.cpp's server; `transformers serve` ignores them)."""
    top_logprobs: int = 20
    """remote_scoring = "logprobs": first tokens the server lists (1-20)."""
    batch_size: int = 8
    """local: prompts scored per forward pass."""
    chat: Literal["auto", "on", "off"] = "auto"
    """local: render each prompt with the model's chat template (the instruction as
    the system turn, demonstrations and query as the user turn, the label word
    scored as the first words of the assistant's answer). `auto`: when the
    tokenizer has a chat template (instruction-tuned models do); `off`: the plain
    text prompt. The remote backend always chats."""
    calibrate: bool = False
    """local, or remote with `remote_scoring = "logprobs"`: contextual calibration
    (Zhao et al. 2021, "Calibrate Before Use"):
    the same prompt with a content-free query (each of `content_free`) gives the
    model's label prior for that prompt; each label's probability is divided by
    it and renormalised over the labels. Costs one more forward pass per distinct
    prompt and content-free input (zero-shot: one in all)."""
    chat_demos: Literal["inline", "turns"] = "turns"
    """How a chat holds the demonstrations: `turns`, each as its own user turn (the
    query template filled with the demonstration's text) answered by an assistant turn
    holding its label word, the way chat models are usually shown examples
    (lm-evaluation-harness's `--fewshot_as_multiturn`); `inline`, as text in the user
    turn before the query. Both backends. On SmolLM2-135M-Instruct, 4 similar shots:
    0.667 accuracy as turns, 0.220 inline (docs/benchmarks.md)."""
    prior: Literal["uniform", "train"] = "uniform"
    """calibrate: the label distribution calibrated scores aim at. `uniform`: Zhao et
    al.'s division by the content-free prior, which treats the labels as equally
    likely; `train`: then multiplied by the label frequencies of the training examples
    (add-one smoothed), the Bayes decision for a test set labelled like the training
    set: on a skewed task (FPB: 61% neutral) a weak zero-shot model then answers the
    frequent label unless the prompt says otherwise. Uses the training labels' counts,
    no demonstrations."""
    content_free: tuple[str, ...] = ("N/A", "", "[MASK]")
    """calibrate: the content-free query texts whose label probabilities are averaged."""
    retrieve: int = 0
    """generation (`data.task = "generation"`): answer from the `retrieve` passages
    most similar to the question (by `embedder`), drawn from every example's context
    split into ~120-word passages, instead of the example's own context: open-book QA
    over the whole document collection. 0 = the example's own context."""


# --- the remote backend's shared parts (classification and generation) ----------------


def remote_endpoint(cfg: IclConfig) -> Any:
    """The `fedtune.remote.Endpoint` of `method.base_url` / `method.api_model`; a
    ConfigError naming the key when one is missing."""
    from fedtune.remote import Endpoint

    if not (cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")):
        raise ConfigError(
            'method.backend = "remote" needs method.base_url (e.g. http://127.0.0.1:8000/v1) '
            "or the OPENAI_BASE_URL environment variable"
        )
    if not cfg.api_model:
        raise ConfigError(
            'method.backend = "remote" needs method.api_model: the model name the server '
            "serves (GET <base_url>/models lists them)"
        )
    return Endpoint.from_env(
        cfg.base_url, cfg.api_model, cfg.api_key_env, timeout=cfg.timeout, retries=cfg.retries
    )


def served_description(cfg: IclConfig) -> str:
    """`<api_model> at <scheme://host:port/path>`: the served model and its server,
    without the credentials or query a URL may carry."""
    from urllib.parse import urlsplit

    url = urlsplit(cfg.base_url or os.environ.get("OPENAI_BASE_URL", ""))
    host = url.hostname or ""
    where = f"{url.scheme}://{host}{f':{url.port}' if url.port else ''}{url.path}"
    return f"{cfg.api_model} at {where}"


Cutter = Callable[..., str]
"""cut(text, n, end=False) -> the first (`end`: last) n tokens of text."""


def token_counter(model: str) -> tuple[Callable[[str], int], Cutter]:
    """(count, cut) of a remote prompt's tokens: `count(text)` and `cut(text, n,
    end=False)` (its first n tokens, or its last n), with `model`'s tokenizer when one
    is named (`method.model`), else estimated at 4 characters a token."""
    if model:
        from fedtune.models import load_tokenizer

        tok = load_tokenizer(model, "decoder")

        def cut(s: str, n: int, end: bool = False) -> str:
            ids = tok(s, add_special_tokens=False)["input_ids"]
            return str(tok.decode(ids[len(ids) - n :] if end else ids[:n])) if n > 0 else ""

        return (lambda s: len(tok(s)["input_ids"])), cut

    def cut_chars(s: str, n: int, end: bool = False) -> str:
        keep = max(0, 4 * n)
        return (s[len(s) - keep :] if end else s[:keep]) if keep else ""

    return (lambda s: math.ceil(len(s) / 4)), cut_chars


# --- prompts: pure functions ---------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One set of prompt templates (see IclConfig for the fields)."""

    name: str
    instruction: str
    demo_template: str
    query_template: str
    separator: str

    @classmethod
    def from_config(cls, cfg: IclConfig, name: str = "default") -> Variant:
        return cls(name, cfg.instruction, cfg.demo_template, cfg.query_template, cfg.separator)

    @property
    def tail(self) -> str:
        """What follows `{text}` in the query template; the label word comes after it."""
        return self.query_template.split("{text}", 1)[1]

    def check(self, where: str = "method.") -> Variant:
        """Refuse templates with missing or unknown placeholders (ConfigError)."""
        rules = {
            "instruction": ({"labels"}, set()),
            "demo_template": ({"text", "label"}, {"text", "label"}),
            "query_template": ({"text"}, {"text"}),
        }
        for field_name, (allowed, required) in rules.items():
            value = getattr(self, field_name)
            found = _PLACEHOLDER.findall(value)
            unknown = sorted({f for f in found if f not in allowed})
            if unknown:
                shown = ", ".join("{" + u + "}" for u in unknown)
                ok = ", ".join("{" + a + "}" for a in sorted(allowed))
                raise ConfigError(
                    f"{where}{field_name} = {value!r} has unknown placeholder(s) {shown}; "
                    f"it may use {ok}"
                )
            missing = sorted(required - set(found))
            if missing:
                shown = " and ".join("{" + m + "}" for m in missing)
                raise ConfigError(f"{where}{field_name} = {value!r} must contain {shown}")
        if _PLACEHOLDER.findall(self.query_template).count("text") > 1:
            raise ConfigError(
                f"{where}query_template = {self.query_template!r} must contain {{text}} once"
            )
        return self


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace `{name}` placeholders in one pass (a text holding "{label}" stays as is)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def format_instruction(instruction: str, words: Sequence[str]) -> str:
    return _fill(instruction, {"labels": ", ".join(words)})


def format_demo(template: str, text: str, word: str) -> str:
    return _fill(template, {"text": text, "label": word})


def format_query(template: str, text: str) -> str:
    return _fill(template, {"text": text})


def build_prompt(
    variant: Variant, demos: Sequence[tuple[str, str]], query: str, words: Sequence[str]
) -> str:
    """The local backend's prompt: instruction, demonstrations ((text, label word)
    pairs) and query, joined by the separator; an empty instruction is left out."""
    parts = [format_instruction(variant.instruction, words)] if variant.instruction else []
    parts += [format_demo(variant.demo_template, t, w) for t, w in demos]
    parts.append(format_query(variant.query_template, query))
    return variant.separator.join(parts)


def build_messages(
    variant: Variant,
    demos: Sequence[tuple[str, str]],
    query: str,
    words: Sequence[str],
    turns: bool = False,
) -> list[dict[str, str]]:
    """A chat: the instruction and the allowed answers as the system message, then
    the demonstrations and the query in the user message (`turns`: each demonstration
    as a user turn, its query template filled, answered by an assistant turn with
    its label word; then the query)."""
    answer = "Answer with exactly one of: " + ", ".join(words) + "."
    instruction = format_instruction(variant.instruction, words)
    system = f"{instruction} {answer}" if instruction else answer
    messages = [{"role": "system", "content": system}]
    if turns:
        for t, w in demos:
            messages += [{"role": "user", "content": format_query(variant.query_template, t)},
                         {"role": "assistant", "content": w}]  # fmt: skip
        parts = [format_query(variant.query_template, query)]
    else:
        parts = [format_demo(variant.demo_template, t, w) for t, w in demos]
        parts.append(format_query(variant.query_template, query))
    return [*messages, {"role": "user", "content": variant.separator.join(parts)}]


def contextual_calibration(
    scores: np.ndarray, prior: np.ndarray, rows: Sequence[Sequence[int]]
) -> np.ndarray:
    """Zhao et al. 2021: p(label | prompt) renormalised over the labels, divided by
    the mean over content-free queries of the same, renormalised again. scores
    [N, K] and prior [M, K] are label log-likelihoods; rows[i] the prior rows of
    query i. Returns calibrated log-probabilities [N, K]."""
    def normalise(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)

    p_prior = np.exp(normalise(prior))
    mean_prior = np.stack([p_prior[list(r)].mean(0) for r in rows])
    out = normalise(normalise(scores) - np.log(np.maximum(mean_prior, 1e-30)))
    return out.astype(np.float32)


def query_seed(seed: int, text: str) -> list[int]:
    """Seed of a query's random demonstrations: the method's seed and the text, so
    a query gets the same demonstrations whatever its position or batch."""
    return [
        seed % 2**63,
        int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little"),
    ]


def select_random(
    pool_labels: Sequence[int],
    excluded: set[int],
    shots: int,
    balanced: bool,
    rng: np.random.Generator,
) -> list[int]:
    """`shots` distinct pool positions, none in `excluded`. Balanced: labels are
    taken in turn (in a random order), each with a random unused example; a label
    that runs out is skipped."""
    n = len(pool_labels)
    if shots <= 0 or n == 0:
        return []
    if not balanced:
        drawn = rng.choice(n, size=min(n, shots + len(excluded)), replace=False)
        return [int(i) for i in drawn if int(i) not in excluded][:shots]
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(pool_labels):
        by_label.setdefault(int(y), []).append(i)
    queues = []
    for label in rng.permutation(sorted(by_label)):
        members = np.array(by_label[int(label)])
        take = rng.choice(
            len(members), size=min(len(members), shots + len(excluded)), replace=False
        )
        queues.append([int(members[j]) for j in take if int(members[j]) not in excluded])
    out: list[int] = []
    while len(out) < shots and any(queues):
        for q in queues:
            if q and len(out) < shots:
                out.append(q.pop(0))
    return out


def stratified_subset(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """At most `n` examples with the labels in their original proportions, chosen
    with a seeded generator and returned in their original order."""
    if len(examples) <= n:
        return list(examples)
    perm = np.random.default_rng(seed).permutation(len(examples))
    counts = Counter(e.label for e in examples)
    seen: Counter[str] = Counter()
    keys = {}
    for i in perm:
        label = examples[int(i)].label
        keys[int(i)] = (seen[label] + 0.5) / counts[label]  # spreads each label evenly
        seen[label] += 1
    chosen = sorted(keys, key=lambda i: keys[i])[:n]
    return [examples[i] for i in sorted(chosen)]


def load_variants(path: str | Path, base: Variant) -> list[Variant]:
    """The `[[variant]]` tables of a TOML file; fields a variant leaves out are
    `base`'s. Any problem is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"method.variants = {str(path)!r}: no such file; give a TOML file "
            "with [[variant]] tables"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"method.variants file {p}: not valid TOML ({e}); fix the file") from e
    extra = sorted(set(data) - {"variant"})
    tables = data.get("variant")
    if extra or not isinstance(tables, list) or not tables:
        raise ConfigError(
            f"method.variants file {p}: expected only [[variant]] tables (each with a name "
            "and any of instruction, demo_template, query_template, separator)"
            + (f"; found {', '.join(extra)}" if extra else "")
        )
    keys = {f.name for f in fields(Variant)}
    out: list[Variant] = []
    for i, table in enumerate(tables, 1):
        unknown = sorted(set(table) - keys)
        if unknown:
            raise ConfigError(
                f"method.variants file {p}: variant {i} has unknown key(s) "
                f"{', '.join(unknown)}; valid: {', '.join(sorted(keys))}"
            )
        bad = sorted(k for k, v in table.items() if not isinstance(v, str))
        if bad:
            raise ConfigError(
                f"method.variants file {p}: variant {i}: {', '.join(bad)} must be strings"
            )
        name = table.get("name", "")
        if not name:
            raise ConfigError(f"method.variants file {p}: variant {i} needs a name")
        if any(v.name == name for v in out):
            raise ConfigError(f"method.variants file {p}: two variants are named {name!r}")
        out.append(replace(base, **table).check(f"method.variants file {p}: variant {name!r} "))
    return out


def fit_to_budget(
    render: Callable[[list[int], str], str],
    count: Callable[[str], int],
    cut: Callable[[str, int], str],
    demos: list[int],
    query: str,
    budget: int,
) -> tuple[list[int], str, bool]:
    """Keep the prompt `render(demos, query)` within `budget` tokens: drop
    demonstrations from the end, then cut the query text. Returns the kept
    demonstrations, the query text and whether it was cut."""
    kept = list(demos)
    while True:
        if count(render(kept, query)) <= budget:
            return kept, query, False
        if not kept:
            break
        kept.pop()
    overhead = count(render([], ""))
    allowed = budget - overhead
    while allowed > 0:
        short = cut(query, allowed)
        over = count(render([], short)) - budget
        if over <= 0:
            return [], short, True
        allowed -= over
    raise ConfigError(
        f"the prompt's instruction and templates alone take {overhead} tokens, leaving no "
        f"room for the text within {budget} tokens; raise method.max_context or shorten "
        "method.instruction / method.query_template"
    )


# --- the method ---------------------------------------------------------------------

_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}
"""The last causal LM loaded for scoring, by (name, dtype, device): the frozen LM is
only read, so the sites of a federation run in one process share one copy."""


def release_shared_lm() -> None:
    """Forget the shared LM (methods that hold it keep their reference)."""
    _LOADED.clear()


@register
class ICL(FrozenMethod[IclConfig], QueryFederated):
    name = "icl"
    description = (
        "in-context learning: zero/few-shot prompting of a causal LM (local or OpenAI-compatible)"
    )
    config_class = IclConfig

    @property
    def query_protocol(self) -> str:
        cfg = self.config
        demos = ("with demonstrations drawn from its own examples" if cfg.shots > 0 else
                 "zero-shot (no demonstrations: every site ran the same prompt)")  # fmt: skip
        text = (f"for each query the server sent the query's text to every site; each site "
                f"prompted the LM {demos} and sent back its probability of each label: no "
                "example of a site left it. The server averaged the sites' probabilities.")
        if cfg.prior == "train":
            text += (" With method.prior = \"train\" each site aimed its calibrated "
                     "probabilities at its own label frequencies, which its answers reveal.")
        return text

    @classmethod
    def for_task(cls, task: str) -> type[FrozenMethod[Any]]:
        if task == "generation":
            from fedtune.methods.icl_generate import GenerationICL

            return GenerationICL
        return super().for_task(task)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        for key, value, low in (
            ("shots", cfg.shots, 0),
            ("select_on", cfg.select_on, 1),
            ("max_context", cfg.max_context, 0),
            ("retries", cfg.retries, 0),
            ("concurrency", cfg.concurrency, 1),
            ("max_tokens", cfg.max_tokens, 1),
            ("batch_size", cfg.batch_size, 1),
        ):
            if value < low:
                raise ConfigError(f"method.{key} = {value} must be >= {low}")
        if cfg.timeout <= 0:
            raise ConfigError(f"method.timeout = {cfg.timeout} must be > 0 seconds")
        if cfg.calibrate and cfg.backend == "remote" and cfg.remote_scoring == "text":
            raise ConfigError(
                'method.calibrate = true needs label probabilities, which free-text answers '
                '(method.remote_scoring = "text") do not give; set method.remote_scoring = '
                '"logprobs" (a server that returns top_logprobs), use the local backend or '
                "set method.calibrate = false"
            )
        if cfg.remote_scoring not in ("text", "logprobs"):
            raise ConfigError(f"method.remote_scoring = {cfg.remote_scoring!r}: choose "
                              '"text" or "logprobs"')  # fmt: skip
        if not 1 <= cfg.top_logprobs <= 20:
            raise ConfigError(f"method.top_logprobs = {cfg.top_logprobs} must be 1 to 20 "
                              "(the chat-completions API's range)")  # fmt: skip
        if cfg.prior not in ("uniform", "train"):
            raise ConfigError(f'method.prior = {cfg.prior!r}: choose "uniform" or "train"')
        if cfg.prior == "train" and not cfg.calibrate:
            raise ConfigError('method.prior = "train" corrects calibrated scores; set '
                              "method.calibrate = true")  # fmt: skip
        if cfg.calibrate and not cfg.content_free:
            raise ConfigError(
                'method.calibrate = true needs content-free query texts; set e.g. '
                'method.content_free = ["N/A", "", "[MASK]"]'
            )
        words = tuple(self.model_config.label_words) or self.labels
        if len(words) != len(self.labels):
            raise ConfigError(
                f"model.label_words has {len(words)} entries but there are {len(self.labels)} "
                f"labels ({', '.join(self.labels)}); give one word per label, in label order"
            )
        self.words: tuple[str, ...] = words
        if cfg.backend == "remote" and cfg.remote_scoring == "logprobs":
            from fedtune.remote import normalize_answer

            normed = [normalize_answer(w) for w in words]
            if len(set(normed)) < len(normed) or not all(normed):
                raise ConfigError(
                    f"label words {list(words)} cannot be told apart by their first tokens "
                    "(two are the same word once case, spaces and punctuation are ignored, "
                    'or one is empty), which method.remote_scoring = "logprobs" needs; set '
                    "distinct model.label_words"
                )
        self.variant = Variant.from_config(cfg).check()
        self.model_name = cfg.model or self.model_config.name
        if cfg.backend == "local":
            from fedtune.models import detect_kind, load_config

            if detect_kind(load_config(self.model_name)) != "decoder":
                raise ConfigError(
                    f'method icl with method.backend = "local" scores label words with a '
                    f"causal LM, but {self.model_name!r} is an encoder; set method.model to "
                    "a causal LM (e.g. Qwen/Qwen2.5-0.5B-Instruct) or use method.backend = "
                    '"remote"'
                )
        self._pool: list[Example] | None = None
        self._store: VectorStore | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._embedder: Embedder | None = None
        self._lm: Any = None
        self._tokenizer: Any = None
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._formulations: dict[str, GenerativeClassifier] = {}
        self._counter: tuple[Callable[[str], int], Cutter] | None = None

    # --- the demonstration pool -------------------------------------------------------

    def fit(
        self,
        train: list[Example],
        directory: Path | None = None,
        validation: list[Example] | None = None,
    ) -> ICL:
        t0 = time.perf_counter()
        cfg = self.config
        unknown = sorted({e.label for e in train} - set(self.labels))
        if unknown:
            raise ConfigError(
                f"training examples have label(s) {', '.join(unknown)} outside "
                f"the labels {', '.join(self.labels)}"
            )
        if cfg.shots > 0 and not train:
            raise ConfigError(
                "icl needs training examples to draw demonstrations from; "
                "set method.shots = 0 for zero-shot prompting"
            )
        if cfg.prior == "train" and not train:
            raise ConfigError('method.prior = "train" needs training examples to count the '
                              'labels of; set method.prior = "uniform"')  # fmt: skip
        if cfg.backend == "remote":
            self._endpoint()  # a missing URL or model name fails now, not after work
        self._pool = list(train)
        if 0 < len(train) < cfg.shots:
            self.notes.append(
                f"icl: only {len(train)} training examples, so prompts hold at "
                f"most {len(train)} demonstrations (method.shots = {cfg.shots})"
            )
        if self._uses_index:
            self._build_index(directory)
        if cfg.variants:
            self._choose_variant(validation or [])
        self.fit_seconds += time.perf_counter() - t0
        return self

    @property
    def _uses_index(self) -> bool:
        return self.config.selection == "similar" and self.config.shots > 0

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.config.embedder)
        return self._embedder

    def _build_index(self, directory: Path | None) -> None:
        assert self._pool is not None
        if not self._pool:
            return
        if directory is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="fedtune-icl-")
            path = Path(self._tmpdir.name) / INDEX_DIR
        else:
            path = Path(directory) / INDEX_DIR
        emb = self._get_embedder()
        vectors = emb.embed([e.text for e in self._pool])
        store = VectorStore.create(path, emb.fingerprint, int(vectors.shape[1]), overwrite=True)
        store.add(vectors, [e.text for e in self._pool], [e.label for e in self._pool])
        self._store = store

    def _demonstrations(self, texts: list[str]) -> list[list[int]]:
        """Pool positions of each query's demonstrations, most important first."""
        cfg = self.config
        if cfg.shots == 0:
            return [[] for _ in texts]
        if self._pool is None:
            raise ModelError("icl has no demonstration pool; call fit() first")
        same_text: dict[str, set[int]] = {}
        for i, e in enumerate(self._pool):
            same_text.setdefault(e.text, set()).add(i)
        if cfg.selection == "similar":
            if not self._pool:
                return [[] for _ in texts]
            if self._store is None:
                raise ModelError("icl has no similarity index; call fit() first")
            extra = max(len(s) for s in same_text.values())
            queries = self._get_embedder().embed(texts)
            hits = self._store.search(queries, cfg.shots + extra)
            return [
                [h.row for h in hs if h.text != t][: cfg.shots]
                for t, hs in zip(texts, hits, strict=True)
            ]
        index = {label: i for i, label in enumerate(self.labels)}
        pool_labels = [index[e.label] for e in self._pool]
        return [
            select_random(
                pool_labels,
                same_text.get(t, set()),
                cfg.shots,
                cfg.balanced,
                np.random.default_rng(query_seed(self.seed, t)),
            )
            for t in texts
        ]

    def _pairs(self, positions: list[int]) -> list[tuple[str, str]]:
        pool = self._pool or []
        word = dict(zip(self.labels, self.words, strict=True))
        return [(pool[i].text, word[pool[i].label]) for i in positions]

    # --- prompt variants ----------------------------------------------------------------

    def _choose_variant(self, validation: list[Example]) -> None:
        variants = load_variants(self.config.variants, Variant.from_config(self.config))
        if not validation:
            self.variant = variants[0]
            self.notes.append(
                f"icl: no validation set to compare the {len(variants)} prompt "
                f"variants on; kept the first, {variants[0].name!r}"
            )
            return
        subset = stratified_subset(validation, self.config.select_on, self.seed)
        y = self.label_ids(subset)
        texts = [e.text for e in subset]
        best, best_acc = variants[0], -1.0
        for v in variants:
            scores = self._predict(texts, v, record=False)
            top = np.sort(scores, axis=-1)
            decided = top[:, -1] > top[:, -2] if scores.shape[1] > 1 else np.ones(len(y), bool)
            acc = float(((scores.argmax(-1) == y) & decided).mean())
            self.notes.append(
                f"icl: prompt variant {v.name!r}: validation accuracy {acc:.4f} "
                f"on {len(subset)} examples"
            )
            if acc > best_acc:
                best, best_acc = v, acc
        self.variant = best
        self.notes.append(f"icl: chose prompt variant {best.name!r}")

    # --- scoring ----------------------------------------------------------------------

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        return self._predict(list(texts), self.variant, record=True)

    # Federated by query: demonstrations stay at the site that holds them.

    def query_payload(self, queries: list[Example]) -> Payload:
        return {"texts": [e.text for e in queries]}

    def answer_queries(self, payload: Payload) -> Payload:
        texts = [str(t) for t in payload["texts"]]
        return {"logp": log_normalize(self.predict_scores(texts)).astype(np.float32)}

    def combine_answers(self, answers: list[Payload]) -> np.ndarray:
        """The mean of the sites' label probabilities, as log-probabilities [Q, K]. Each
        site's answer is renormalised first, so no site outweighs another by sending
        scores that do not sum to one."""
        logp = np.stack([log_normalize(np.asarray(a["logp"], np.float64)) for a in answers])
        return (np.logaddexp.reduce(logp, axis=0) - math.log(len(answers))).astype(np.float32)

    def _predict(self, texts: list[str], variant: Variant, record: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        demos = self._demonstrations(texts)
        if self.config.backend == "local":
            return self._score_local(texts, demos, variant, record)
        return self._score_remote(texts, demos, variant, record)

    def _note_overflow(self, dropped: int, cut: int, n: int, budget: int) -> None:
        if dropped:
            self.notes.append(
                f"icl: {dropped} of {n} prompts dropped demonstrations to fit {budget} tokens"
            )
        if cut:
            self.notes.append(
                f"icl: {cut} of {n} query texts were truncated to fit {budget} tokens"
            )

    def _fit_all(
        self,
        texts: list[str],
        demos: list[list[int]],
        render: Callable[[list[tuple[str, str]], str], str],
        count: Callable[[str], int],
        cut: Callable[[str, int], str],
        budget: int,
        total: int,
        record: bool,
    ) -> list[tuple[list[tuple[str, str]], str]]:
        """(demonstration pairs, query text) per query, within the token budget."""
        out = []
        dropped = truncated = 0
        for text, positions in zip(texts, demos, strict=True):
            if budget >= _NO_LIMIT:
                out.append((self._pairs(positions), text))
                continue
            pairs = self._pairs(positions)
            kept, query, was_cut = fit_to_budget(
                lambda ks, q, pairs=pairs: render([pairs[k] for k in ks], q),  # type: ignore[misc]
                count,
                cut,
                list(range(len(pairs))),
                text,
                budget,
            )
            dropped += len(kept) < len(pairs)
            truncated += was_cut
            out.append(([pairs[k] for k in kept], query))
        if record:
            self._note_overflow(dropped, truncated, len(texts), total)
        return out

    # local: label-word likelihoods under the causal LM

    def _load_lm(self) -> None:
        if self._lm is not None:
            return
        from fedtune.models import load_base_model, load_config, load_tokenizer

        # fp32 on the CPU; on a GPU, bf16 for checkpoints saved in half precision.
        dtype = torch.float32
        if self._device.type == "cuda" and torch.cuda.is_bf16_supported():
            saved = getattr(load_config(self.model_name), "dtype", None)
            if str(saved).removeprefix("torch.") in ("bfloat16", "float16"):
                dtype = torch.bfloat16
        key = (self.model_name, str(dtype), str(self._device))
        if key not in _LOADED:
            lm: Any = load_base_model(self.model_name, "decoder", self.labels, dtype=dtype)
            _LOADED.clear()  # one LM held at a time
            _LOADED[key] = (load_tokenizer(self.model_name, "decoder"),
                            lm.to(self._device).eval())  # fmt: skip
        self._tokenizer, self._lm = _LOADED[key]

    @property
    def _turns(self) -> bool:
        """Demonstrations as chat turns (method.chat_demos)."""
        return self.config.chat_demos == "turns"

    @property
    def uses_chat(self) -> bool:
        """Whether local prompts go through the tokenizer's chat template."""
        mode = self.config.chat
        if mode == "off" or self.config.backend == "remote":
            return False
        self._load_lm()
        has = bool(getattr(self._tokenizer, "chat_template", None))
        if mode == "on" and not has:
            raise ConfigError(
                f'method.chat = "on" but the tokenizer of {self.model_name!r} has no chat '
                'template; set method.chat = "auto" or "off"'
            )
        return has

    def _renderer(self, variant: Variant) -> tuple[Renderer, str]:
        """(render(pairs, query) -> the whole local prompt, its tail): the tail is what
        follows the query text; the label word is scored right after it."""
        if not self.uses_chat:
            return (lambda pairs, q: build_prompt(variant, pairs, q, self.words)), variant.tail
        tok = self._tokenizer

        def render(pairs: list[tuple[str, str]], query: str) -> str:
            msgs = build_messages(variant, pairs, query, self.words, self._turns)
            return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

        sentinel = "\x00fedtune-query\x00"
        rendered = render([], sentinel)
        if rendered.count(sentinel) != 1:
            raise ModelError(
                f"the chat template of {self.model_name!r} does not keep the query text as "
                'given; set method.chat = "off"'
            )
        return render, rendered.split(sentinel, 1)[1]

    def _formulation(self, variant: Variant, tail: str) -> GenerativeClassifier:
        self._load_lm()
        chat = self.uses_chat  # fixed for this method: the tail alone is the key
        if tail not in self._formulations:
            # The whole prompt up to the end of the query text is the "text"; the
            # template adds the tail, after which the label word is scored (after a
            # space in a plain prompt; as the assistant's first word in a chat). The
            # budget is enforced here, so the text is never cut there. A rendered
            # chat holds its own special tokens.
            self._formulations[tail] = GenerativeClassifier(
                self._tokenizer, self.labels, _NO_LIMIT, "{text}" + tail, self.words,
                word_prefix="" if chat else " ", add_special_tokens=not chat,
            )  # fmt: skip
        return self._formulations[tail]

    def context_budget(self) -> int:
        """Tokens a prompt plus its answer may take."""
        if self.config.max_context:
            return self.config.max_context
        if self.config.backend == "remote":
            return _NO_LIMIT
        self._load_lm()
        mc = self._lm.config
        positions = (
            getattr(mc, "max_position_embeddings", None)
            or getattr(mc, "n_positions", None)
            or MAX_POSITIONS
        )
        return min(int(positions), MAX_POSITIONS)

    def _score_local(
        self, texts: list[str], demos: list[list[int]], variant: Variant, record: bool
    ) -> np.ndarray:
        render, tail = self._renderer(variant)
        form = self._formulation(variant, tail)
        tok = self._tokenizer
        total = self.context_budget()
        budget = total - max(len(ids) for ids in form.label_ids)

        def count(prompt: str) -> int:
            return len(tok(prompt)["input_ids"])

        def cut(text: str, n: int) -> str:
            return str(tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n]))

        def head(pairs: list[tuple[str, str]], query: str) -> str:
            prompt = render(pairs, query)
            if not prompt.endswith(tail):
                raise ModelError(
                    f"the chat template of {self.model_name!r} changes the end of the "
                    'query turn; set method.chat = "off"'
                )
            return prompt[: len(prompt) - len(tail)]

        fitted = self._fit_all(texts, demos, render, count, cut, budget, total, record)
        scores = self._score_heads(form, [head(pairs, query) for pairs, query in fitted])
        return self._calibrated(
            scores, fitted, head, lambda heads: self._score_heads(form, list(heads))
        )

    def _calibrated(
        self,
        scores: np.ndarray,
        fitted: list[tuple[list[tuple[str, str]], str]],
        render: Callable[[list[tuple[str, str]], str], Any],
        score: Callable[[list[Any]], np.ndarray],
    ) -> np.ndarray:
        """Contextual calibration (when method.calibrate) of label scores [N, K]:
        every distinct prompt with each content-free query instead of the real one
        (zero-shot or shared demonstrations: scored once). `render(pairs, query)` is a
        prompt `score` takes (a string or a chat), keyed by its JSON."""
        if not self.config.calibrate:
            return scores
        distinct: dict[str, tuple[int, Any]] = {}
        rows = []
        for pairs, _ in fitted:
            row = []
            for c in self.config.content_free:
                prompt = render(pairs, c)
                key = json.dumps(prompt)
                if key not in distinct:
                    distinct[key] = (len(distinct), prompt)
                row.append(distinct[key][0])
            rows.append(row)
        prior = score([prompt for _, prompt in distinct.values()])
        calibrated = contextual_calibration(scores, prior, rows)
        if self.config.prior == "uniform":
            return calibrated
        return calibrated + np.log(self.label_prior()).astype(np.float32)

    def label_prior(self) -> np.ndarray:
        """The training examples' (the pool's) label frequencies, add-one smoothed [K]."""
        if not self._pool:
            raise ModelError('method.prior = "train" needs the training examples; call fit()')
        counts = np.bincount(self.label_ids(self._pool), minlength=len(self.labels)) + 1.0
        return counts / counts.sum()

    def _score_heads(self, form: GenerativeClassifier, heads: list[str]) -> np.ndarray:
        """Log-likelihood of each label word after each prompt head -> [N, K]."""
        feats = form.encode(heads)
        order = np.argsort([f["length"] for f in feats], kind="stable")  # less padding
        scores = np.zeros((len(heads), len(self.labels)), dtype=np.float32)
        bs = self.config.batch_size
        if self.bf16:
            from fedtune.train import warn_slow_bf16

            warn_slow_bf16(True, self._device)
        with torch.no_grad(), torch.autocast(self._device.type, torch.bfloat16, enabled=self.bf16):
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                batch = to_device(form.collate([feats[i] for i in idx]), self._device)
                scores[idx] = form.evaluate(self._lm, batch)[1].float().cpu().numpy()
        return scores

    # remote: free-text answers parsed into labels

    def _endpoint(self) -> Any:
        return remote_endpoint(self.config)

    def _remote_counter(self) -> tuple[Callable[[str], int], Cutter]:
        if self._counter is None:
            self._counter = token_counter(self.config.model)
        return self._counter

    def _score_remote(
        self, texts: list[str], demos: list[list[int]], variant: Variant, record: bool
    ) -> np.ndarray:
        from fedtune.remote import ChatClient, label_logprobs, map_requests, parse_label

        cfg = self.config
        logprobs = cfg.remote_scoring == "logprobs"
        answer_tokens = 1 if logprobs else cfg.max_tokens
        total = self.context_budget()
        budget = total - answer_tokens if total < _NO_LIMIT else _NO_LIMIT
        count, cut = self._remote_counter() if total < _NO_LIMIT else (len, lambda s, n: s)

        def chat_of(pairs: list[tuple[str, str]], query: str) -> list[dict[str, str]]:
            return build_messages(variant, pairs, query, self.words, self._turns)

        def render(pairs: list[tuple[str, str]], query: str) -> str:  # what counts tokens
            return "\n".join(m["content"] for m in chat_of(pairs, query))

        fitted = self._fit_all(texts, demos, render, count, cut, budget, total, record)
        scores = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        index = {label: i for i, label in enumerate(self.labels)}
        progress = count_bar("[bold]icl[/] remote", hide=len(texts) < PROGRESS_MIN)

        with ChatClient(self._endpoint()) as chat, progress:
            task = progress.add_task("requests", total=len(texts))

            def label_scores(messages: list[dict[str, str]]) -> np.ndarray:
                top = chat.first_token_logprobs(messages, top=cfg.top_logprobs)
                progress.advance(task)
                return label_logprobs(top, self.words)

            def content_free(chats: list[list[dict[str, str]]]) -> np.ndarray:
                progress.update(task, total=len(texts) + len(chats))
                return np.stack(map_requests(label_scores, chats, cfg.concurrency))

            def text_scores(messages: list[dict[str, str]]) -> np.ndarray:
                answer = chat.complete(messages, max_tokens=cfg.max_tokens, temperature=0.0)
                progress.advance(task)
                label = parse_label(answer, self.labels, self.words)
                row = np.zeros(len(self.labels), dtype=np.float32)  # no label: undecided
                if label is not None:
                    row[:] = -1e4
                    row[index[label]] = 0.0
                return row

            chats = [chat_of(pairs, query) for pairs, query in fitted]
            rows = map_requests(label_scores if logprobs else text_scores, chats, cfg.concurrency)
            if rows:
                scores = np.stack(rows).astype(np.float32)
            flat = np.ptp(scores, axis=1) == 0  # a uniform row: no label preferred
            scores = self._calibrated(scores, fitted, chat_of, content_free)
        # Calibration would turn a row that names no label into the label the
        # content-free prompt likes least: such a row stays undecided.
        scores[flat] = 0.0
        unparseable = int(flat.sum())
        if record:
            self.extra_metrics["unparseable_share"] = unparseable / len(texts)
            if unparseable:
                what = ("put no label word among their top log-probabilities" if logprobs
                        else "named no label (unparseable; counted as wrong)")  # fmt: skip
                self.notes.append(f"icl: {unparseable} of {len(texts)} remote answers {what}")
        return scores

    # --- sizes, save / load --------------------------------------------------------------

    @property
    def model_description(self) -> str:
        """The LM that answers: `method.model` (else `model.name`), or the served model
        and its server (without credentials or query a URL may carry)."""
        if self.config.backend == "remote":
            return served_description(self.config)
        return self.model_name

    @property
    def base_parameters(self) -> int:
        if self.config.backend == "remote":
            return 0
        if self._lm is None:  # count without loading the weights (a federation's server)
            from transformers import AutoModelForCausalLM

            from fedtune.models import load_config

            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(load_config(self.model_name))
            return int(sum(p.numel() for p in lm.parameters()))
        return int(sum(p.numel() for p in self._lm.parameters()))

    def _save_state(self, directory: Path) -> None:
        v = self.variant
        prompt = {
            "variant": v.name,
            "instruction": v.instruction,
            "demo_template": v.demo_template,
            "query_template": v.query_template,
            "separator": v.separator,
            "label_words": list(self.words),
            "seed": self.seed,
        }
        (directory / PROMPT_FILE).write_text(
            json.dumps(prompt, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        with (directory / DEMOS_FILE).open("w", encoding="utf-8") as fh:
            for e in self._pool or []:
                fh.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")
        if self._uses_index and self._pool:
            here = (directory / INDEX_DIR).resolve()
            if self._store is None or self._store.path.resolve() != here:
                self._build_index(directory)

    def _load_state(self, directory: Path) -> None:
        prompt_file, demos_file = directory / PROMPT_FILE, directory / DEMOS_FILE
        if not prompt_file.is_file() or not demos_file.is_file():
            raise ModelError(f"{directory}: no {PROMPT_FILE} or {DEMOS_FILE}; not an icl model")
        p = json.loads(prompt_file.read_text(encoding="utf-8"))
        self.variant = Variant(
            p["variant"], p["instruction"], p["demo_template"], p["query_template"], p["separator"]
        ).check(f"{prompt_file}: ")
        self.words = tuple(p["label_words"])
        # The seed picks each query's random demonstrations; load_frozen does not pass it.
        self.seed = int(p.get("seed", self.seed))
        self._formulations = {}
        with demos_file.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        self._pool = [Example(r["text"], r["label"]) for r in rows]
        if self._uses_index and self._pool:
            self._store = VectorStore.open(directory / INDEX_DIR, self._get_embedder().fingerprint)
