"""In-context learning for the generation task: the base model answers with 0..k
solved examples in its prompt. The zero-shot row is the "base model" baseline every
trained method is measured against.

It is the `icl` method (same `[method]` keys: shots, selection, embedder, seed,
max_context, batch_size, and the remote backend's) when `data.task = "generation"`:
`ICL.for_task` hands over to this class. Demonstrations are rendered like training
examples (fedtune.generate.InstructionLM): through the chat template as earlier user /
assistant turns, else as earlier prompt + response blocks, each cut to
`model.max_length` tokens. Prompts that would pass the context budget drop
demonstrations, last first (remote: cut to `model.max_length` first, then dropped).

`method.backend = "remote"` sends the same conversation (the system prompt, each
demonstration as a user turn answered by an assistant turn, the question with its
context) to an OpenAI-compatible chat-completions endpoint (fedtune.remote), up to
`method.concurrency` requests at once, and takes its greedy answer of at most
`model.max_new_tokens` tokens: the answer length every generation method is measured
at. The server applies its own chat template.

Federated, by query (fedtune.federated.query), as classification ICL is: the server
sends each question (with its context) to every site; a site answers with its own
demonstrations (and, with `method.retrieve`, passages of its own documents) and says
how sure its LM was: the answer's mean token log-probability. Answers are texts, which
cannot be averaged, so the server keeps, per question, the answer of the site that
was surest. No demonstration or document is sent as such, only answers (which may
quote them) and one number each. Local backend only (a remote one would send a
site's texts to the endpoint the run's config names).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.data import Example
from fedtune.errors import ConfigError, ModelError
from fedtune.evaluate import Metrics
from fedtune.generate import InstructionLM, answer_metrics, generate_texts
from fedtune.methods.frozen import FrozenMethod, Payload, QueryFederated
from fedtune.methods.icl import (
    MAX_POSITIONS,
    Cutter,
    IclConfig,
    query_seed,
    remote_endpoint,
    served_description,
    token_counter,
)
from fedtune.progress import count_bar

DEMOS_FILE = "demonstrations.jsonl"
PROMPT_FILE = "prompt.json"


class GenerationICL(FrozenMethod[IclConfig], QueryFederated):
    name = "icl"
    description = "in-context learning: zero/few-shot answers of a causal LM"
    config_class = IclConfig
    task = "generation"
    validates = False  # nothing is chosen on validation: test answers only

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        for key, value, low in (("shots", cfg.shots, 0), ("retrieve", cfg.retrieve, 0),
                                ("batch_size", cfg.batch_size, 1), ("retries", cfg.retries, 0),
                                ("concurrency", cfg.concurrency, 1),
                                ("max_context", cfg.max_context, 0)):  # fmt: skip
            if value < low:
                raise ConfigError(f"method.{key} = {value} must be >= {low}")
        if cfg.calibrate or cfg.prior != "uniform":
            raise ConfigError("method.calibrate and method.prior correct label scores; "
                              "generation has none: leave them unset")  # fmt: skip
        tokens = self.model_config.max_new_tokens
        if cfg.max_context and cfg.max_context <= tokens:
            raise ConfigError(f"method.max_context = {cfg.max_context} leaves no room for a "
                              f"prompt: it holds the answer's model.max_new_tokens = {tokens} "
                              "too; raise it, or 0 for the model's own limit")  # fmt: skip
        if cfg.backend == "remote":
            if cfg.remote_scoring != "text":
                raise ConfigError('method.remote_scoring = "logprobs" scores label words; a '
                                  'generation answer is text: leave it "text"')  # fmt: skip
            if cfg.max_tokens != IclConfig.max_tokens:
                raise ConfigError(
                    f"method.max_tokens = {cfg.max_tokens} limits a label answer; a generation "
                    f"answer is at most model.max_new_tokens = {self.model_config.max_new_tokens}"
                    " tokens, locally and remotely: set that instead"
                )
            if cfg.timeout <= 0:
                raise ConfigError(f"method.timeout = {cfg.timeout} must be > 0 seconds")
        elif cfg.backend != "local":
            raise ConfigError(f'method.backend = {cfg.backend!r}: use "local" or "remote"')
        self.model_name = cfg.model or self.model_config.name
        self._pool: list[Example] = []
        self._vectors: np.ndarray | None = None
        self._embedder: Any = None
        self._lm: Any = None
        self._form: InstructionLM | None = None
        self._counter: tuple[Callable[[str], int], Cutter] | None = None
        self.dropped = self.cut = self.over = self.shortened = 0
        if cfg.backend == "remote":
            remote_endpoint(cfg)  # a missing URL or model name fails now, not after work

    @property
    def remote(self) -> bool:
        return self.config.backend == "remote"

    @property
    def model_description(self) -> str:
        """The LM that answers: `method.model` (else `model.name`), or the served model
        and its server."""
        return served_description(self.config) if self.remote else self.model_name

    # --- the model and the prompt ------------------------------------------------------

    def _load(self) -> InstructionLM:
        if self._form is None:
            from fedtune.methods.icl import _LOADED
            from fedtune.models import load_base_model, load_tokenizer

            # The frozen LM is only read: the sites of an in-process federation share
            # one copy (as classification ICL's do), one LM held at a time.
            key = (self.model_name, "float32", "generation")
            if key not in _LOADED:
                lm = load_base_model(self.model_name, "decoder", self.labels).eval()
                _LOADED.clear()
                _LOADED[key] = (load_tokenizer(self.model_name, "decoder"), lm)
            tok, self._lm = _LOADED[key]
            mc = self.model_config
            self._form = InstructionLM(tok, self.labels, mc.max_length, mc.prompt_template,
                                       mc.chat, mc.max_target_length,
                                       mc.system_prompt, mc.context_keep)  # fmt: skip
        return self._form

    def _budget(self) -> int:
        """Prompt tokens allowed: the context window less the answer's tokens (remote:
        `method.max_context` or no limit)."""
        if self.config.max_context:
            return self.config.max_context - self.model_config.max_new_tokens
        if self.remote:
            return 1 << 60
        mc = self._lm.config
        positions = getattr(mc, "max_position_embeddings", None) or MAX_POSITIONS
        return min(int(positions), MAX_POSITIONS) - self.model_config.max_new_tokens

    def _prompt(self, form: InstructionLM, demos: list[Example], query: Example) -> list[int]:
        tok = form.tokenizer
        turns = [(*form.fit_texts(d.text, d.context), d.response) for d in demos]
        ins, ctx = form.fit_texts(query.text, query.context)
        while True:
            if form.chat:
                msgs: list[dict[str, str]] = []
                for i, c, r in turns:
                    msgs += [{"role": "user", "content": f"{c}\n\n{i}" if c else i},
                             {"role": "assistant", "content": r}]  # fmt: skip
                msgs.append({"role": "user", "content": f"{ctx}\n\n{ins}" if ctx else ins})
                text = form.chat_text(msgs)
            else:
                # Each answer ends with EOS, as in training: the model learns from the
                # demonstrations where an answer stops (else it writes the next block).
                # The system prompt, if any, comes once, first.
                end = tok.eos_token or ""
                text = "".join(form.render(i, c, system=n == 0) + f"{r}{end}\n\n"
                               for n, (i, c, r) in enumerate(turns))  # fmt: skip
                text += form.render(ins, ctx, system=not turns)
            ids: list[int] = tok(text, add_special_tokens=not form.chat)["input_ids"]
            if len(ids) <= self._budget() or not turns:
                return ids
            turns.pop()  # the last demonstration first
            self.dropped += 1

    # --- demonstrations ------------------------------------------------------------------

    def fit(self, train: list[Example], directory: Path | None = None,
            validation: list[Example] | None = None) -> GenerationICL:  # fmt: skip
        t0 = time.perf_counter()
        self._pool = list(train)
        if self.config.shots and self.config.selection == "similar":
            self._vectors = self._embed(self._pool)
        self.fit_seconds = time.perf_counter() - t0
        return self

    def _embed(self, examples: list[Example]) -> np.ndarray:
        from fedtune.embed import Embedder

        if self._embedder is None:
            self._embedder = Embedder(self.config.embedder)
        return self._embedder.embed([f"{e.context}\n{e.text}" if e.context else e.text
                               for e in examples])  # fmt: skip

    def _demonstrations(self, queries: list[Example]) -> list[list[Example]]:
        k = min(self.config.shots, len(self._pool))
        if k == 0:
            return [[] for _ in queries]
        if self.config.selection == "similar":
            assert self._vectors is not None
            sims = self._embed(queries) @ self._vectors.T  # [Q, N] cosine (unit vectors)
            return [[self._pool[j] for j in np.argsort(-row, kind="stable")[:k]] for row in sims]
        out = []
        for q in queries:
            rng = np.random.default_rng(query_seed(self.seed, q.text + q.context))
            out.append([self._pool[j] for j in rng.choice(len(self._pool), k, replace=False)])
        return out

    # --- retrieval-grounded answers ---------------------------------------------------------

    def _grounded(self, queries: list[Example]) -> list[Example]:
        """The queries with their context replaced by the `retrieve` passages nearest to
        the question, from every context of the pool and the queries (the documents;
        never a response). Passages: ~120-word windows (fedtune.vectorstore)."""
        from fedtune.vectorstore import split_passages

        docs = dict.fromkeys(e.context for e in [*self._pool, *queries] if e.context)
        passages = [p.text for d in docs for p in split_passages(d, "context")]
        if not passages:
            raise ConfigError("method.retrieve > 0 needs examples with a context to retrieve "
                              "from; the data has none")  # fmt: skip
        vectors = self._embed([Example(t, "") for t in passages])  # [P, D] unit rows
        sims = self._embed([Example(q.text, "") for q in queries]) @ vectors.T  # [Q, P]
        k = min(self.config.retrieve, len(passages))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        hit = sum(any(passages[j] in " ".join(q.context.split()) for j in row)
                  for q, row in zip(queries, top, strict=True))  # fmt: skip
        self.notes.append(f"retrieval: {k} of {len(passages)} passages per question; a passage "
                          f"of the question's own context among them for {hit} of "
                          f"{len(queries)}")  # fmt: skip
        return [replace(q, context="\n\n".join(passages[j] for j in row))
                for q, row in zip(queries, top, strict=True)]  # fmt: skip

    # --- the remote backend ----------------------------------------------------------------

    def _messages(self, demos: list[Example], query: Example) -> list[dict[str, str]]:
        """The conversation a server is sent: the system prompt (`model.system_prompt`),
        each demonstration as a user turn (context, then instruction, as the local chat
        prompt has them) answered by its response, then the question. With
        `method.max_context` set, a prompt over the budget first has its demonstrations
        cut to `model.max_length` tokens each (as the local prompt's are), then dropped
        (last first) until the prompt and `model.max_new_tokens` fit; a question still
        too long alone keeps the start of its context (its end with
        `model.context_keep = "end"`), counted with `method.model`'s tokenizer when
        named, else at 4 characters a token. A question (with the system prompt) longer
        than the budget alone is sent as it is and counted in the notes."""
        system = self.model_config.system_prompt

        def user(e: Example, context: str) -> dict[str, str]:
            return {"role": "user", "content": f"{context}\n\n{e.text}" if context else e.text}

        def chat(shots: list[Example], context: str) -> list[dict[str, str]]:
            msgs = [{"role": "system", "content": system}] if system else []
            for d in shots:
                msgs += [user(d, d.context), {"role": "assistant", "content": d.response}]
            return [*msgs, user(query, context)]

        if not self.config.max_context:
            return chat(demos, query.context)
        if self._counter is None:
            self._counter = token_counter(self.config.model)
        count, cut = self._counter
        budget = self._budget()

        def size(msgs: list[dict[str, str]]) -> int:
            return count("\n".join(m["content"] for m in msgs))

        shots = list(demos)
        if shots and size(chat(shots, query.context)) > budget:
            # Shorten before dropping: each demonstration cut to `model.max_length` tokens
            # (instruction and context together, as the local prompt's always are).
            shots = [self._fitted(d) for d in shots]
        while shots and size(chat(shots, query.context)) > budget:
            shots.pop()  # the last demonstration first
            self.dropped += 1
        self.shortened += sum(c != d for c, d in zip(shots, demos, strict=False))  # sent
        msgs = chat(shots, query.context)
        over = size(msgs) - budget
        if over > 0 and query.context:
            # Which end of a context is kept: model.context_keep, as the local prompt does.
            end = self.model_config.context_keep == "end"
            keep = count(query.context) - over
            while over > 0 and keep > 0:  # counts of pieces need not add up: measure again
                msgs = chat(shots, cut(query.context, keep, end=end))
                over = size(msgs) - budget
                keep -= max(over, 1)
            if over > 0:
                msgs = chat(shots, "")
                over = size(msgs) - budget
            self.cut += 1
        if over > 0:
            self.over += 1
        return msgs

    def _fitted(self, e: Example) -> Example:
        """A demonstration cut to `model.max_length` tokens of the remote counter, as
        InstructionLM.fit_texts cuts the local prompt's: the context first (the end
        `model.context_keep` does not keep), then the instruction's end."""
        assert self._counter is not None
        counted, cut = self._counter
        special = counted("")  # a named tokenizer's BOS/EOS: fit_texts counts without them

        def count(text: str) -> int:
            return counted(text) - special

        limit = self.model_config.max_length
        if count(e.text) >= limit:
            return replace(e, text=cut(e.text, limit), context="")
        room = limit - count(e.text)
        if e.context and count(e.context) > room:
            return replace(e, context=cut(e.context, room,
                                          end=self.model_config.context_keep == "end"))
        return e

    def _answer_remote(self, queries: list[Example], demos: list[list[Example]]) -> list[str]:
        from fedtune.remote import ChatClient, map_requests

        chats = [self._messages(d, q) for d, q in zip(demos, queries, strict=True)]
        progress = count_bar(f"[bold]icl {self.config.shots}-shot[/] remote")
        tokens = self.model_config.max_new_tokens
        with ChatClient(remote_endpoint(self.config)) as client, progress:
            task = progress.add_task("requests", total=len(chats))

            def ask(messages: list[dict[str, str]]) -> str:
                text = client.complete(messages, max_tokens=tokens, temperature=0.0)
                progress.advance(task)
                return text.strip()

            return map_requests(ask, chats, self.config.concurrency)

    # --- answering -----------------------------------------------------------------------

    def answer(self, queries: list[Example], confidences: list[float] | None = None) -> list[str]:
        """Greedy answers to generation examples (their responses are not looked at).
        `confidences`, when given, gets each answer's mean token log-probability (the
        local backend only: a chat server's answers come without one)."""
        if self.config.retrieve > 0:
            queries = self._grounded(queries)
        self.dropped = self.cut = self.over = self.shortened = 0
        demos = self._demonstrations(queries)
        if self.remote:
            if confidences is not None:
                raise ConfigError("a chat server's answers come without their log-probabilities: "
                                  'answers with a confidence need method.backend = "local"')
            answers = self._answer_remote(queries, demos)
            if self.shortened:
                self.notes.append(f"{self.shortened} demonstrations cut to model.max_length = "
                                  f"{self.model_config.max_length} tokens to fit the context "
                                  f"budget of {self._budget()} prompt tokens")  # fmt: skip
            if self.dropped:
                self.notes.append(f"{self.dropped} demonstrations dropped to fit the context "
                                  f"budget of {self._budget()} prompt tokens")  # fmt: skip
            if self.cut:
                self.notes.append(f"{self.cut} of {len(queries)} contexts cut to fit "
                                  f"{self._budget()} prompt tokens")  # fmt: skip
            if self.over:
                self.notes.append(
                    f"{self.over} of {len(queries)} prompts are over the budget of "
                    f"{self._budget()} prompt tokens even without demonstrations and context "
                    "(the question and system prompt alone): raise method.max_context"
                )
            return answers
        form = self._load()
        prompts = [self._prompt(form, d, q) for d, q in zip(demos, queries, strict=True)]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._lm.to(device)
        answers = generate_texts(self._lm, form.tokenizer, prompts,
                                 self.model_config.max_new_tokens, self.config.batch_size,
                                 bf16=self.bf16, description=f"icl {self.config.shots}-shot",
                                 confidences=confidences, stop_texts=form.stop_texts)  # fmt: skip
        if self.dropped:
            self.notes.append(f"{self.dropped} demonstrations dropped to fit the context budget "
                              f"of {self._budget()} prompt tokens")  # fmt: skip
        return answers

    def evaluate(self, examples: list[Example]) -> Metrics:
        return self._scored(self.answer(examples), examples)

    def _scored(self, answers: list[str], examples: list[Example]) -> Metrics:
        return answer_metrics(answers, [e.response for e in examples],
                              [e.label for e in examples], self.labels,
                              [e.text for e in examples],
                              contexts=[e.context for e in examples])  # fmt: skip

    def predict(self, texts: list[str]) -> list[str]:
        return self.answer([Example(t, self.labels[0] if self.labels else "") for t in texts])

    def predict_scores(self, texts: list[str]) -> np.ndarray:
        raise ConfigError("a generation model has no label scores; use predict() for answers")

    def metrics(self, scores: np.ndarray, y: np.ndarray) -> Metrics:
        raise ConfigError("a generation model has no label scores to score")

    # --- federated by query: demonstrations and documents stay at their site ----------

    @property
    def query_protocol(self) -> str:
        cfg = self.config
        demos = (f"{cfg.shots} demonstrations drawn from its own examples" if cfg.shots else
                 "no demonstrations")  # fmt: skip
        docs = (f", the question's context replaced by the {cfg.retrieve} passages nearest to it "
                "among its own documents and the question's context"
                if cfg.retrieve > 0 else "")  # fmt: skip
        return (f"for each question the server sent its text and context to every site; each "
                f"site prompted the LM with {demos}{docs}, and sent back its greedy answer "
                "and the answer's mean token log-probability: no example or document of a "
                "site was sent as such (an answer may quote one). The server kept, per "
                "question, the answer its site's LM was surest of.")  # fmt: skip

    def query_payload(self, queries: list[Example]) -> Payload:
        return {"text": [q.text for q in queries], "context": [q.context for q in queries]}

    def answer_queries(self, payload: Payload) -> Payload:
        label = self.labels[0] if self.labels else ""
        queries = [Example(str(t), label, context=str(c))
                   for t, c in zip(payload["text"], payload["context"], strict=True)]  # fmt: skip
        sure: list[float] = []
        answers = self.answer(queries, sure)
        return {"answer": answers, "confidence": np.asarray(sure, np.float32)}

    def combine_answers(self, answers: list[Payload]) -> np.ndarray:
        """Per question, the answer of the surest site (ties: the first site, in the
        server's order, which is by site name: fedtune.federated.query), with the site's
        name when the server added it: an object array of (answer, site). An empty
        answer (the model ended at once) is kept only when every site's is empty: an
        answer that says nothing is no answer, however sure."""
        texts = [a["answer"] for a in answers]
        sure = np.stack([np.asarray(a["confidence"], np.float64) for a in answers])  # [S, Q]
        if sure.ndim != 2 or not all(isinstance(t, list) and len(t) == sure.shape[1]
                                     for t in texts):  # fmt: skip
            raise ValueError("not one answer text and one confidence per question")
        if not (np.isfinite(sure).all() and (sure <= 0).all()):
            raise ValueError("a confidence is not a log-probability (finite, at most 0)")
        said = np.array([[bool(str(x).strip()) for x in t] for t in texts])  # [S, Q]
        out = np.empty(sure.shape[1], dtype=object)
        for q, s in enumerate(np.where(said, sure, -np.inf).argmax(0)):
            site = answers[s].get("site")
            out[q] = (str(texts[s][q]), str(site[q]) if site is not None else "")
        return out

    def query_metrics(self, combined: np.ndarray, examples: list[Example]) -> Metrics:
        """The kept answers scored; each row of the run's answers.jsonl names the site
        whose answer it is, and a note counts them per site."""
        m = self._scored([str(a) for a, _ in combined], examples)
        sites = [str(site) for _, site in combined]
        for row, site in zip(m.answers, sites, strict=True):
            row["site"] = site
        counts = Counter(s for s in sites if s)
        if counts:
            self.notes.append("answers kept per site: " + ", ".join(
                f"{name} {n} of {len(sites)}" for name, n in sorted(counts.items())))
        return m

    # --- sizes, save / load --------------------------------------------------------------

    @property
    def base_parameters(self) -> int:
        if self.remote:
            return 0  # not known here: the server holds the model
        self._load()
        return int(sum(p.numel() for p in self._lm.parameters()))

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "task": "generation"}

    def _save_state(self, directory: Path) -> None:
        (directory / PROMPT_FILE).write_text(json.dumps({"seed": self.seed}), encoding="utf-8")
        with (directory / DEMOS_FILE).open("w", encoding="utf-8") as fh:
            for e in self._pool:
                fh.write(json.dumps({"instruction": e.text, "context": e.context,
                                     "response": e.response, "category": e.label},
                                    ensure_ascii=False) + "\n")  # fmt: skip

    def _load_state(self, directory: Path) -> None:
        demos = directory / DEMOS_FILE
        if not demos.is_file():
            raise ModelError(f"{directory}: no {DEMOS_FILE}; not a generation icl model")
        self.seed = int(json.loads((directory / PROMPT_FILE).read_text("utf-8"))["seed"])
        with demos.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        self.fit([Example(r["instruction"], r["category"], context=r["context"],
                          response=r["response"]) for r in rows])  # fmt: skip
