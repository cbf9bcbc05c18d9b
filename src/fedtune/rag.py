"""Retrieval-augmented answers: `fedtune index DOCS_DIR` splits documents into
passages, embeds them and stores them in a vector index (fedtune.vectorstore);
`fedtune ask "question"` retrieves the top-k passages, builds a grounded prompt
and answers with a causal LM (local, transformers) or an OpenAI-compatible
endpoint, and returns the sources it gave the model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.embed import Embedder
from fedtune.errors import ConfigError, IndexStoreError
from fedtune.vectorstore import Hit, VectorStore, read_documents, split_passages

INSTRUCTION = (
    "Answer the question using only the numbered passages below, and cite the passages "
    "you use as [1], [2]. If the passages do not contain the answer, say that you do not know."
)


@dataclass
class IndexReport:
    path: Path
    documents: int
    passages: int
    embedder: str


def build_index(docs_dir: str | Path, output: str | Path, embedder: str = "minilm",
                words: int = 120, overlap: int = 20, site: str = "",
                overwrite: bool = False, max_length: int = 256) -> IndexReport:  # fmt: skip
    """Documents (*.txt, *.md) -> passages -> embeddings -> a new index at `output`.
    Everything is checked and embedded before the index is created, so bad input
    leaves nothing behind. `max_length` tokens per passage are embedded (256, MiniLM's
    limit: 120 English words are about 170 tokens)."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise IndexStoreError(f"{out} already exists and is not empty; pass --overwrite "
                                  "to replace it or choose another --output")  # fmt: skip
        if not (out / VectorStore.META_FILE).is_file():
            raise IndexStoreError(f"{out} is not a fedtune index; --overwrite replaces only an "
                                  "index: choose another --output")  # fmt: skip
    docs = read_documents(docs_dir)
    passages = [p for rel, text in docs for p in split_passages(text, rel, words, overlap)]
    if not passages:
        raise IndexStoreError(f"{docs_dir}: the documents hold no text to index")
    emb = Embedder(embedder, max_length=max_length)
    vectors = emb.embed([p.text for p in passages])
    # Built beside the target and swapped in only when complete: a failure (bad
    # vectors, a full disk, Ctrl-C) leaves the previous index as it was.
    staging = out.parent / f".{out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        store = VectorStore.create(staging, emb.fingerprint, vectors.shape[1])
        store.add(vectors, [p.text for p in passages], None, [site] * len(passages),
                  [f"{p.source}#w{p.start}" for p in passages])  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return IndexReport(out, len(docs), len(passages), emb.fingerprint)


def retrieve(index: str | Path, question: str, k: int = 4, embedder: str = "") -> list[Hit]:
    if not question.strip():
        raise ConfigError("the question is empty; pass the text to ask")
    stored = VectorStore.open(index).embedder
    emb = Embedder(embedder, max_length=Embedder.from_fingerprint(stored).max_length) if (
        embedder) else Embedder.from_fingerprint(stored)  # fmt: skip
    # Refuses an index made with another model: its vectors are not comparable.
    store = VectorStore.open(index, emb.fingerprint)
    return store.search(emb.embed([question]), k)[0]


def grounded_prompt(question: str, hits: list[Hit]) -> str:
    blocks = [f"[{i}] ({h.source}) {h.text}" for i, h in enumerate(hits, 1)]
    return f"{INSTRUCTION}\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\nAnswer:"


def grounded_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    """The grounded prompt as a chat: the instruction as the system turn, the
    passages and the question as the user turn."""
    user = grounded_prompt(question, hits).split("\n\n", 1)[1]
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": user}]


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]
    prompt: str
    notes: list[str] = field(default_factory=list)


def answer_local(model_name: str, question: str, hits: list[Hit], max_new_tokens: int = 128,
                 max_context: int = 0) -> Answer:  # fmt: skip
    """Greedy answer from a local causal LM; passages that do not fit the model's
    context are dropped from the end (least similar first), and the answer says so.
    A model with a chat template (an instruction-tuned one) gets the grounded prompt
    as a chat (`grounded_messages`) and answers as the assistant; others continue
    the plain prompt after "Answer:"."""
    from fedtune.models import detect_kind, load_config, load_tokenizer, resolve_model_name

    if detect_kind(load_config(model_name)) != "decoder":
        raise ConfigError(f"--model {model_name} is not a causal LM; pass a decoder "
                          "(e.g. Qwen/Qwen2.5-0.5B-Instruct) or use --base-url")  # fmt: skip
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_name, "decoder")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name(model_name)).eval()
    limit = max_context or min(int(getattr(model.config, "max_position_embeddings", 2048)), 4096)
    budget = limit - max_new_tokens
    notes: list[str] = []
    chat = bool(getattr(tok, "chat_template", None))

    def render(passages: list[Hit]) -> str:
        if not chat:
            return grounded_prompt(question, passages)
        msgs = grounded_messages(question, passages)
        return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))

    def tokens(prompt: str) -> Any:
        # A rendered chat holds its own special tokens (BOS included).
        return tok(prompt, add_special_tokens=not chat, return_tensors="pt")

    kept = list(hits)
    prompt = render(kept)
    while tokens(prompt)["input_ids"].shape[1] > budget and kept:
        kept.pop()
        prompt = render(kept)
    if len(kept) < len(hits):
        notes.append(f"{len(hits) - len(kept)} of {len(hits)} passages dropped to fit "
                     f"{limit} tokens of context")  # fmt: skip
    ids = tokens(prompt)
    if ids["input_ids"].shape[1] > budget:
        raise ConfigError(f"the question alone is longer than {budget} tokens of context")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    text = str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)).strip()
    return Answer(question, text, kept, prompt, notes)


def answer_remote(base_url: str, api_model: str, question: str, hits: list[Hit],
                  max_new_tokens: int = 256, api_key_env: str = "OPENAI_API_KEY",
                  timeout: float = 60.0, retries: int = 3) -> Answer:  # fmt: skip
    from fedtune.remote import ChatClient, Endpoint

    ep = Endpoint.from_env(base_url, api_model, api_key_env, timeout=timeout, retries=retries)
    prompt = grounded_prompt(question, hits)
    with ChatClient(ep) as client:
        text = client.complete(grounded_messages(question, hits), max_tokens=max_new_tokens)
    return Answer(question, text.strip(), hits, prompt)
