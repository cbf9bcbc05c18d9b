"""Two ways to turn a model into a classifier; both are used by every method.

- `HeadClassifier` (encoders): text -> model with a sequence-classification
  head -> logits [B, K]; loss = cross-entropy.
- `GenerativeClassifier` (decoders), the setup of the p-tuning post: the causal
  LM reads `template` (e.g. "Sentence: {text}\\nSentiment:") and is trained to
  produce the label word; it predicts by scoring the log-likelihood of every
  label word after the prompt, so it never emits an invalid label.

A formulation turns texts into unpadded features once (`encode`), pads a batch
(`collate`), and computes the training loss and per-label scores of a batch.
It never knows which method adapted the model.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.data.sources import Example

Feature = dict[str, Any]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Formulation(ABC):
    task: ClassVar[str] = "classification"
    """The task this formulation poses (fedtune.evaluate picks the metrics by it)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, labels: tuple[str, ...], max_length: int
    ):
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length

    def encode_examples(self, examples: Sequence[Example]) -> list[Feature]:
        """Labelled examples -> features (what every regime calls)."""
        index = {label: i for i, label in enumerate(self.labels)}
        return self.encode([e.text for e in examples], [index[e.label] for e in examples])

    @abstractmethod
    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        """One unpadded feature dict per text; `length` is its token count."""

    @abstractmethod
    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        """Pad a list of features to the longest one (dynamic padding)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean training loss of the batch (a scalar with grad)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(loss summed over the batch's loss units, number of units) and scores
        [B, K]: log-probabilities of each label. Called under no_grad."""

    def scores(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self.evaluate(model, batch)[1]


class HeadClassifier(Formulation):
    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        feats = []
        for i in range(len(texts)):
            f: Feature = {k: enc[k][i] for k in enc}
            f["length"] = len(enc["input_ids"][i])
            if labels is not None:
                f["labels"] = labels[i]
            feats.append(f)
        return feats

    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        rows = [{k: v for k, v in f.items() if k != "length"} for f in features]
        return dict(self.tokenizer.pad(rows, return_tensors="pt"))

    def _logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits  # [B, K]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self._logits(model, batch).float()
        n = torch.tensor(float(len(logits)), device=logits.device)
        if "labels" in batch:
            loss_sum = F.cross_entropy(logits, batch["labels"], reduction="sum")
        else:
            loss_sum = torch.zeros((), device=logits.device)
        return torch.stack([loss_sum, n]), logits.log_softmax(-1)


def pad_batch(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token id lists -> (ids [B, T], attention mask [B, T]), padded with `pad` on the
    right (training and scoring) or on the left (`left`: prompts to generate from)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class CausalLMFormulation(Formulation):
    """What every decoder formulation shares: right-padded batches of token ids with a
    `prompt_len`, and a loss on the tokens after the prompt (a label word, or a whole
    response for generation)."""

    def _pad(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        return pad_batch(seqs, self.tokenizer.pad_token_id)

    @staticmethod
    def _last_logits(model: nn.Module, ids: Tensor, mask: Tensor, first: int) -> Tensor:
        """Next-token logits at positions first..T-1 of `ids` -> [B, T - first, V].

        The LM head runs only there (transformers' `logits_to_keep`, the last
        K positions): label tokens sit at the end of each prompt, so with length
        bucketing K is a few positions, not T. On small LMs the head is a large
        share of the compute (Gemma 3 270M: a 262k x 640 head, more multiply-adds per
        token than its transformer layers) and of the memory ([B, T, V] logits).
        Models whose forward has no `logits_to_keep` compute every position.
        Prompt-learning methods prepend virtual tokens; the last T positions are the
        real ones either way."""
        width = ids.shape[1]
        if _keeps_logits(model):
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
            return logits[:, -(width - first) :]
        return model(input_ids=ids, attention_mask=mask).logits[:, -width:][:, first:]

    @classmethod
    def _target_logprobs(cls, model: nn.Module, ids: Tensor, mask: Tensor, tmask: Tensor) -> Tensor:
        """log p(ids[:, t] | ids[:, :t]) at the target positions (tmask [B, T-1]) -> [N].

        Where the model's logits are plainly head(final hidden state) (`_plain_head`),
        the forward pass returns the hidden states (the head is swapped for an
        identity while it runs) and the head runs on the N target positions only, in
        chunks: a response's tokens start at different positions in each row, so the
        [B, T - first, V] logits of `_last_logits` were mostly thrown away (DPO on
        SmolLM2, 64 pairs: 2.5 GB of them). Other models take the general path."""
        cols = tmask.any(0).nonzero()
        first = int(cols[0]) if len(cols) else tmask.shape[1] - 1
        targets = ids[:, 1:][tmask]
        head = _plain_head(model)
        if head is None:
            return cls._target_logprobs_general(model, ids, mask, tmask, first, targets)
        with _head_as_identity(model, head) as swapped:
            hidden = cls._last_logits(model, ids, mask, first) if swapped else None
        if hidden is None or hidden.shape[-1] != head.in_features:  # not the head's input
            return cls._target_logprobs_general(model, ids, mask, tmask, first, targets)
        states = hidden[:, :-1][tmask[:, first:]]  # [N, H]
        out = [head(states[i : i + HEAD_CHUNK]).float().log_softmax(-1)
               .gather(-1, targets[i : i + HEAD_CHUNK, None]).squeeze(-1)
               for i in range(0, len(states), HEAD_CHUNK)]  # fmt: skip
        return torch.cat(out) if out else states.new_zeros(0, dtype=torch.float32)

    @classmethod
    def _target_logprobs_general(cls, model: nn.Module, ids: Tensor, mask: Tensor,
                                 tmask: Tensor, first: int, targets: Tensor) -> Tensor:  # fmt: skip
        logits = cls._last_logits(model, ids, mask, first)  # positions first..T-1
        # Only the N target positions get a softmax over the vocabulary ([N, V], not
        # [B, T, V]: 150k-token vocabularies are large).
        picked = logits[:, :-1][tmask[:, first:]].float()
        return picked.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    def _target_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, T-1]: True where the next token is a target token."""
        ids, mask, plen = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
        return (pos >= plen[:, None]) & mask[:, 1:].bool()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Mean negative log-likelihood per target token of the batch."""
        tmask = self._target_mask(batch)
        logp = self._target_logprobs(model, batch["input_ids"], batch["attention_mask"], tmask)
        return -logp.mean()


class GenerativeClassifier(CausalLMFormulation):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        labels: tuple[str, ...],
        max_length: int,
        template: str,
        label_words: tuple[str, ...] = (),
        word_prefix: str = " ",
        add_special_tokens: bool = True,
    ):
        """`word_prefix` goes between the template's end and the label word (a
        space after "Sentiment:"; nothing after a chat template's assistant turn
        opener). `add_special_tokens=False` for prompts that already hold them
        (a rendered chat template starts with its own BOS)."""
        super().__init__(tokenizer, labels, max_length)
        self.word_prefix = word_prefix
        self.add_special_tokens = add_special_tokens
        if "{text}" not in template:
            raise ConfigError(f"model.template = {template!r} must contain {{text}}")
        words = label_words or labels
        if len(words) != len(labels):
            raise ConfigError(
                f"model.label_words has {len(words)} entries but there are {len(labels)} labels "
                f"({', '.join(labels)}); give one word per label, in label order"
            )
        self.template = template
        self.label_ids = [self._label_tokens(w) for w in words]
        if len({tuple(ids) for ids in self.label_ids}) != len(words):
            raise ConfigError(f"model.label_words {words} tokenize identically; use distinct words")
        # All labels one distinct token (the usual case): one forward pass on the
        # prompt scores every label at once. Otherwise each label is scored in turn.
        self.single_token = all(len(ids) == 1 for ids in self.label_ids)

    def _label_tokens(self, word: str) -> list[int]:
        """Tokens of " word" as they come after the template's end: tokenized in
        context, because SentencePiece tokenizers (Llama-2, Mistral) tokenize a
        lone " word" with an extra leading-space token."""
        tok = self.tokenizer
        tail = self.template.split("{text}")[-1] or " "
        context = tok(tail, add_special_tokens=False)["input_ids"]
        full = tok(tail + self.word_prefix + word, add_special_tokens=False)["input_ids"]
        if full[: len(context)] == context and len(full) > len(context):
            return full[len(context) :]
        return tok(self.word_prefix + word, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        text_ids = tok(texts, add_special_tokens=False)["input_ids"]
        # Truncate the text, never the template: decode the first max_length tokens
        # back to text only for the (rare) long inputs.
        texts = [
            str(tok.decode(ids[: self.max_length])) if len(ids) > self.max_length else t
            for t, ids in zip(texts, text_ids, strict=True)
        ]
        prompts = [self.template.replace("{text}", t) for t in texts]
        return tok(prompts, add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        feats = []
        for i, prompt in enumerate(self._prompt_ids(texts)):
            f: Feature = {"prompt_len": len(prompt)}
            if labels is not None:
                f["input_ids"] = prompt + self.label_ids[labels[i]]
                f["labels"] = labels[i]
            else:
                f["input_ids"] = prompt
            f["length"] = len(f["input_ids"])
            feats.append(f)
        return feats

    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        ids, mask = self._pad([f["input_ids"] for f in features])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "prompt_len": torch.tensor([f["prompt_len"] for f in features]),
        }
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids, mask, plen = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        rows = torch.arange(len(ids), device=ids.device)
        if self.single_token:
            first = int(plen.min()) - 1
            logits = self._last_logits(model, ids, mask, first)
            last = logits[rows, plen - 1 - first].float().log_softmax(-1)  # [B, V] after the prompt
            scores = last[:, [ids_[0] for ids_ in self.label_ids]]  # [B, K]
        else:
            scores = torch.stack(
                [self._sequence_logprob(model, ids, plen, k) for k in range(len(self.labels))],
                dim=1,
            )
        if "labels" in batch:
            # Loss = mean negative log-likelihood per label token, as in training.
            units = torch.tensor(
                float(sum(len(self.label_ids[y]) for y in batch["labels"].tolist())),
                device=ids.device,
            )
            loss_sum = -scores[rows, batch["labels"]].sum()
        else:
            loss_sum = units = torch.zeros((), device=ids.device)
        return torch.stack([loss_sum, units]), scores

    def _sequence_logprob(self, model: nn.Module, ids: Tensor, plen: Tensor, k: int) -> Tensor:
        """Sum of log p(label k's tokens | prompt) for every row -> [B]."""
        seqs = [ids[i, : plen[i]].tolist() + self.label_ids[k] for i in range(len(ids))]
        kids, kmask = (t.to(ids.device) for t in self._pad(seqs))
        tmask = self._target_mask({"input_ids": kids, "attention_mask": kmask, "prompt_len": plen})
        per_row = torch.zeros(tmask.shape, device=ids.device)
        per_row[tmask] = self._target_logprobs(model, kids, kmask, tmask)
        return per_row.sum(-1)


HEAD_CHUNK = 2048
"""Target positions per LM-head call in `_target_logprobs`: bounds the [rows, V] fp32
logits of evaluation (SmolLM2: 400 MB per chunk; Gemma 3's 262k vocabulary: 2.1 GB).
Training keeps every chunk's activations for the backward pass, as before."""

PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma",
                              "gemma3_text", "phi3", "smollm3", "olmo2"})  # fmt: skip
"""Model types whose causal-LM forward returns exactly lm_head(final hidden state) (read
in transformers 5.24), unless soft-capping is configured (checked apart). Others
(Gemma 2's and Gemma 3n's tanh soft-capping, RecurrentGemma's, Mamba's dtype cast on
the head's weight...) keep the general path."""

_SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap")


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The LM head of `model` (a PEFT wrapper or the model) when its logits are exactly
    head(final hidden state): a plain nn.Linear (not one a LoRA adapter wraps) of a
    model type in PLAIN_HEAD_TYPES without soft-capping; else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or not _keeps_logits(model):
        return None
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    if any(getattr(c, key, None) is not None for c in (config, text) for key in _SOFT_CAPS):
        return None
    return head


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


@contextmanager
def _head_as_identity(model: nn.Module, head: nn.Module) -> Iterator[bool]:
    """`head` replaced by an identity inside `model` while the block runs: the
    model's "logits" are then its final hidden states. Yields whether the head was
    found (and replaced) in the module tree."""
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if child is head]  # fmt: skip
    identity = _Identity()
    try:
        for parent, name in places:
            setattr(parent, name, identity)
        yield bool(places)
    finally:
        for parent, name in places:
            setattr(parent, name, head)


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the causal LM under `model` (a PEFT wrapper or the model itself)
    takes `logits_to_keep` (transformers' generative models do)."""
    inner: Any = model
    while callable(getattr(inner, "get_base_model", None)):
        base = inner.get_base_model()
        if base is inner:
            break
        inner = base
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
