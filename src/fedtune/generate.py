"""The generation task: instruction (+ context) -> response with a causal LM.

- `InstructionLM` (a Formulation): renders each example as a prompt (through the
  tokenizer's chat template when it has one, else `model.prompt_template`) followed
  by the response and the end-of-sequence token; supervised fine-tuning's loss is the
  mean negative log-likelihood of the response tokens only (the prompt is context,
  not a target), computed by the same code that scores label words for
  classification (fedtune.classify.CausalLMFormulation).
- `generate_texts`: batched greedy decoding with transformers' `generate`, left
  padded, bf16 autocast on request, a progress bar for long sets.
- `generation_metrics`: ROUGE-L (F-measure) and SQuAD exact match / token F1, from
  torchmetrics (the same normalisation as the official SQuAD script), overall and per
  category, plus a few samples for the report.

A formulation never knows which method adapted the model: every decoder method (full,
LoRA, IA3, prompt/prefix/P-tuning) trains and generates through this one file.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from fedtune.classify import CausalLMFormulation, Feature, pad_batch
from fedtune.errors import ConfigError, DataError
from fedtune.progress import bars_visible

if TYPE_CHECKING:
    from fedtune.adapted import AdaptedModel
    from fedtune.data.sources import Example
    from fedtune.evaluate import Metrics

SAMPLES = 5
"""Generated examples kept for the report."""


class InstructionLM(CausalLMFormulation):
    task: ClassVar[str] = "generation"
    CONTEXT_KEEP: ClassVar[str] = "start"
    """What `model.context_keep = auto` keeps of a long context: documents keep their start."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        labels: tuple[str, ...],
        max_length: int,
        template: str,
        chat: str = "auto",
        max_target_length: int = 128,
        system_prompt: str = "",
        context_keep: str = "auto",
    ):
        """`labels` are the categories (metrics per category); `max_length` bounds the
        instruction + context tokens (the context is cut first, keeping its start or
        its end: `context_keep`, `auto` = the class's CONTEXT_KEEP); `template` is used
        when the chat template is not (`chat` = auto/on/off)."""
        super().__init__(tokenizer, labels, max_length)
        if context_keep not in ("auto", "start", "end"):
            raise ConfigError(
                f"model.context_keep = {context_keep!r}: use auto, start (documents) or end "
                "(conversation history)"
            )
        self.context_keep = self.CONTEXT_KEEP if context_keep == "auto" else context_keep
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if chat == "on" and not has_chat:
            raise ConfigError(
                'model.chat = "on" but the tokenizer has no chat template; set model.chat = '
                '"auto" or "off"'
            )
        if "{instruction}" not in template:
            raise ConfigError(
                f"model.prompt_template = {template!r} must contain {{instruction}} (and "
                "may contain {context})"
            )
        self.chat = has_chat and chat != "off"
        self.template = template
        self.system_prompt = system_prompt
        self.max_target_length = max_target_length
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no end-of-sequence token to "
                "end responses with; use a causal LM whose tokenizer has one"
            )
        for key, value in (("max_length", max_length), ("max_target_length", max_target_length)):
            if value < 1:
                raise ConfigError(f"model.{key} = {value} must be at least 1 token")

    # --- prompts ------------------------------------------------------------------

    def render(self, instruction: str, context: str, system: bool = True) -> str:
        """The prompt text, up to where the response starts (`system`: with the system
        prompt, when there is one; few-shot prompts put it only before the first
        block)."""
        if self.chat:
            content = f"{context}\n\n{instruction}" if context else instruction
            return self.chat_text([{"role": "user", "content": content}])
        block = f"### Context:\n{context}\n\n" if context else ""
        text = self.template.replace("{context}", block).replace("{instruction}", instruction)
        return f"{self.system_prompt}\n\n{text}" if self.system_prompt and system else text

    @property
    def stop_texts(self) -> tuple[str, ...]:
        """Plain prompts: the template's block headers ("### Instruction:", "### Context:",
        "### Response:" by default). An answer ends where it starts one of them on a
        line of its own, as lm-evaluation-harness's `until` strings end an answer: a base
        model that has not learnt to write the end token after its answer (few-shot,
        or zero-shot) writes the next block instead. Chat prompts: none (the template's
        end-of-turn token ends the answer)."""
        if self.chat:
            return ()
        pieces = self.template.replace("{context}", "\0").replace("{instruction}", "\0")
        heads = [line.strip() for part in pieces.split("\0") for line in part.splitlines()]
        return tuple(dict.fromkeys(h for h in [*heads, "### Context:"] if h))

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """`messages` (after the system turn, when there is a system prompt) through the
        chat template, up to where the assistant's answer starts."""
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True))
        except Exception as e:  # jinja errors raised by the template itself
            hint = ("; this template may not take a system turn: clear model.system_prompt"
                    if self.system_prompt else "")
            raise ConfigError(
                f"the chat template of {self.tokenizer.name_or_path!r} failed ({e}){hint}, or "
                'set model.chat = "off" to use model.prompt_template'
            ) from e

    def fit_texts(self, instruction: str, context: str) -> tuple[str, str]:
        """(instruction, context) cut to `max_length` tokens together: the context goes
        first (its end, or its start when `context_keep` is `end`), then the
        instruction's end."""
        tok = self.tokenizer
        ins_ids = tok(instruction, add_special_tokens=False)["input_ids"]
        if len(ins_ids) >= self.max_length:
            return str(tok.decode(ins_ids[: self.max_length])), ""
        room = self.max_length - len(ins_ids)
        if context:
            ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
            if len(ctx_ids) > room:
                end = self.context_keep == "end"
                context = str(tok.decode(ctx_ids[len(ctx_ids) - room :] if end else ctx_ids[:room]))
        return instruction, context

    def prompt_ids(self, instructions: Sequence[str], contexts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (instruction + context cut to `max_length`)."""
        # A rendered chat holds its own special tokens (BOS included).
        return [
            self.tokenizer(self.render(*self.fit_texts(i, c or "")),
                           add_special_tokens=not self.chat)["input_ids"]
            for i, c in zip(instructions, contexts, strict=True)
        ]  # fmt: skip

    # --- the Formulation contract -------------------------------------------------------

    def category_ids(self, examples: Sequence[Example]) -> list[int]:
        """Each example's category as its index in `labels`; DataError for an unknown one."""
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = next((e for e in examples if e.label not in index), None)
        if unknown is not None:
            raise DataError(
                f"{unknown.origin or 'example'}: category {unknown.label!r} is not in "
                f"data.labels ({', '.join(self.labels)}); add it there or fix the data"
            )
        return [index[e.label] for e in examples]

    def encode_examples(self, examples: Sequence[Example]) -> list[Feature]:
        categories = self.category_ids(examples)
        prompts = self.prompt_ids([e.text for e in examples], [e.context for e in examples])
        responses = self.tokenizer([e.response for e in examples],
                                   add_special_tokens=False)["input_ids"]  # fmt: skip
        feats = []
        for e, cat, prompt, resp in zip(examples, categories, prompts, responses, strict=True):
            # A cut response ends without EOS: the model must not learn to stop there.
            target = resp[: self.max_target_length]
            if len(resp) <= self.max_target_length:
                target = [*target, self.tokenizer.eos_token_id]
            ids = prompt + target
            feats.append({"input_ids": ids, "prompt_len": len(prompt), "length": len(ids),
                          "labels": cat, "reference": e.response,
                          "instruction": e.text, "context": e.context})  # fmt: skip
        return feats

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Feature]:
        """Prompts only (what `predict` decodes from); `labels` are not used."""
        prompts = self.prompt_ids(texts, [""] * len(texts))
        return [{"input_ids": p, "prompt_len": len(p), "length": len(p), "instruction": t}
                for p, t in zip(prompts, texts, strict=True)]  # fmt: skip

    def collate(self, features: list[Feature]) -> dict[str, Tensor]:
        ids, mask = self._pad([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": mask,
                "prompt_len": torch.tensor([f["prompt_len"] for f in features])}  # fmt: skip

    def evaluate(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed response-token NLL, response tokens) and no scores."""
        tmask = self._target_mask(batch)
        logp = self._target_logprobs(model, batch["input_ids"], batch["attention_mask"], tmask)
        units = tmask.sum().to(logp.dtype)
        return torch.stack([-logp.sum(), units]), logp.new_zeros((len(tmask), 0))


# --- decoding ---------------------------------------------------------------------------


def _stop_ids(model: nn.Module, tok: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's own (Gemma's
    end_of_turn, for one)."""
    ids = {int(tok.eos_token_id)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None:
            ids.add(int(i))
    return sorted(ids)


def _prompt_learning(module: nn.Module) -> str:
    """The PEFT prompt-learning type of `module` ('' for any other model)."""
    for c in (getattr(module, "peft_config", None) or {}).values():
        if getattr(c, "is_prompt_learning", False):
            return str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1]
    return ""


def _greedy_prompt_learning(module: nn.Module, ids: Tensor, mask: Tensor, max_new_tokens: int,
                            stop: list[int]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Greedy decoding of a PEFT prompt-learning model (prompt tuning, P-tuning, prefix
    tuning) with a KV cache and the positions training uses: left-padded ids [B, T]
    and their mask -> ([B, T + new] ids, [B, new] log-probabilities of the new tokens).

    Written here because `generate` gets those models wrong with transformers 5.24 and
    peft 0.21 (tested against whole forward passes): prompt tuning and P-tuning drop
    `position_ids`, so after the first step the new tokens sit V positions (the virtual
    tokens) too early, and padding shifts them further; prefix tuning's prefix
    key/values are ignored ("Both `past_key_values` and `cache` are set"). Here the
    base model gets, once, what PEFT's own forward gives it in training: the V virtual
    tokens' embeddings in front (prompt/P-tuning), or the prefix as the cache; a row's
    real tokens take positions V, V+1, ... whatever its padding (explicit
    `position_ids`); then one token at a time on that cache."""
    peft: Any = module
    base = peft.get_base_model()
    rows = len(ids)
    prompts = peft.get_prompt(batch_size=rows)
    embeds = base.get_input_embeddings()(ids)  # [B, T, H]
    if _prompt_learning(module) == "PREFIX_TUNING":
        cache, virtual = prompts, int(peft.active_peft_config.num_virtual_tokens)
    else:  # [virtual][pads][prompt]: the pads are masked, the positions skip them
        cache, virtual = None, int(prompts.shape[1])
        embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
    full_mask = torch.cat([mask.new_ones(rows, virtual), mask], dim=1)  # the cache's mask
    # Real tokens at V.. in order (as in training); pads get any position (masked).
    positions = (virtual + mask.cumsum(1) - 1).clamp(min=0)
    if cache is None:
        positions = torch.cat([torch.arange(virtual, device=ids.device).expand(rows, -1),
                               positions], dim=1)  # fmt: skip
    # transformers 5.x calls the KV cache `cache` (`past_key_values` is deprecated).
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    out = base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions,
               use_cache=True, logits_to_keep=1, **{key: cache})  # fmt: skip
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    stops = torch.tensor(stop, device=ids.device)
    nxt_pos = positions[:, -1:] + 1  # [B, 1]
    logps = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        nxt = logits.argmax(-1)
        logps.append(logits.log_softmax(-1).gather(1, nxt[:, None]))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        full_mask = torch.cat([full_mask, full_mask.new_ones(rows, 1)], dim=1)
        out = base(input_ids=nxt[:, None], attention_mask=full_mask, position_ids=nxt_pos,
                   use_cache=True, **{key: getattr(out, key)})  # fmt: skip
        nxt_pos = nxt_pos + 1
    return ids, torch.cat(logps, dim=1)


def _stop_at(text: str, stop_texts: Sequence[str]) -> int:
    """Where `text` ends: before the first line that starts with a stop text (its
    length when none does)."""
    ends = [m.start() for s in stop_texts
            if (m := re.search(rf"(?m)^[ \t]*{re.escape(s)}", text))]  # fmt: skip
    return min(ends, default=len(text))


def _tokens_writing(tok: PreTrainedTokenizerBase, ids: list[int], chars: int) -> int:
    """The fewest leading tokens of `ids` whose decoded text is at least `chars`
    characters long: the tokens that wrote an answer cut at `chars`."""
    return next((k for k in range(len(ids) + 1)
                 if len(str(tok.decode(ids[:k], skip_special_tokens=True))) >= chars),
                len(ids))  # fmt: skip


@torch.no_grad()
def generate_texts(
    module: nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
    max_new_tokens: int, batch_size: int = 16, bf16: bool = False,
    description: str = "generate", confidences: list[float] | None = None,
    stop_texts: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """Greedy answers of a causal LM (or its PEFT wrapper) to tokenized prompts, in
    prompt order. Prompts of similar length are batched together (left padded, as
    decoder-only generation needs). `confidences`, when given, is filled with each
    answer's mean token log-probability under the model (its tokens up to and with
    the stop token that ended it), in prompt order: how sure the model was of what it
    wrote, the measure sites' answers are ranked by when generation federates by query.
    An answer also ends before the first line that starts with one of `stop_texts`
    (InstructionLM.stop_texts); its confidence then covers the tokens kept."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ConfigError(f"model.max_new_tokens = {max_new_tokens} must be at least 1")
    stops = _stop_ids(module, tok)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=stops)  # fmt: skip
    lengths = [len(p) for p in prompts]
    order = np.argsort(lengths, kind="stable")
    learning = _prompt_learning(module)
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out = [""] * len(prompts)
    sure = [0.0] * len(prompts)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} answers"), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    try:
        with Progress(*columns, disable=not bars_visible(), transient=True) as bar:
            task = bar.add_task(description, total=len(prompts))
            for idx in groups:
                ids, mask = pad_batch([prompts[i] for i in idx], tok.pad_token_id, left=True)
                ids, mask = ids.to(device), mask.to(device)
                width = ids.shape[1]
                logp: Tensor | None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    if learning:
                        gen, logp = _greedy_prompt_learning(module, ids, mask, max_new_tokens,
                                                            stops)  # fmt: skip
                    else:
                        scored = confidences is not None  # scores kept only when asked
                        res = module.generate(  # type: ignore[operator]
                            input_ids=ids, attention_mask=mask, generation_config=config,
                            output_scores=scored, return_dict_in_generate=scored,
                        )
                        gen = res.sequences if scored else res
                        logp = (module.compute_transition_scores(  # type: ignore[operator]
                            gen, res.scores, normalize_logits=True).float()
                            if scored else None)  # fmt: skip
                        del res  # its KV cache, before the next batch's
                # Decoder-only models return prompt + answer; a model fed embeddings
                # (some prompt-learning paths) returns the answer alone.
                if gen.shape[1] >= width and torch.equal(gen[:, :width], ids):
                    gen = gen[:, width:]
                for r, i in enumerate(idx):
                    answer = gen[r].tolist()
                    # Up to the first stop token (the uncached loop runs past it).
                    cut = next((j for j, t in enumerate(answer) if t in stops), len(answer))
                    text = str(tok.decode(answer[:cut], skip_special_tokens=True))
                    n_taken = min(cut + 1, len(answer))  # with the stop token
                    end = _stop_at(text, stop_texts)
                    if end < len(text):
                        text = text[:end]
                        n_taken = max(1, _tokens_writing(tok, answer[:cut], end))
                    out[i] = text.strip()
                    if confidences is not None and logp is not None:
                        kept = logp[r, :n_taken]
                        sure[i] = float(kept.mean()) if len(kept) else 0.0
                bar.update(task, advance=len(idx))
    finally:
        module.train(was_training)
    if confidences is not None:
        confidences[:] = sure
    return out


# --- metrics ----------------------------------------------------------------------------

GENERATION_METRICS = ("rougeL", "exact_match", "f1")


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per answer: ROUGE-L F-measure, SQuAD exact match and token F1, all in 0..1.
    torchmetrics computes each (its SQuAD metric is the official script's
    normalisation: lower case, no punctuation or articles)."""
    from torchmetrics.functional.text import rouge_score, squad

    out = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        rouge = rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"]
        sq = squad([{"prediction_text": pred, "id": str(i)}],
                   [{"answers": {"answer_start": [0], "text": [ref]}, "id": str(i)}])  # fmt: skip
        out.append({"rougeL": float(rouge), "exact_match": float(sq["exact_match"]) / 100,
                    "f1": float(sq["f1"]) / 100})  # fmt: skip
    return out


def summarize_scores(
    scores: list[dict[str, float]], categories: Sequence[str], labels: Sequence[str]
) -> tuple[dict[str, float], dict[str, Any]]:
    """(mean of each metric, per-category means with their counts)."""
    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in rows])) if rows else float("nan")
                for k in GENERATION_METRICS}  # fmt: skip

    per = {}
    for label in labels:
        rows = [s for s, c in zip(scores, categories, strict=True) if c == label]
        if rows:
            per[label] = {**mean(rows), "n": len(rows)}
    return mean(scores), per


def generation_metrics(
    model: AdaptedModel, feats: list[Feature], loss: float, batch_size: int, bf16: bool
) -> Metrics:
    """Generate an answer for every feature and score it against its reference."""
    form = model.formulation
    prompts = [f["input_ids"][: f["prompt_len"]] for f in feats]
    predictions = generate_texts(model.module, model.tokenizer, prompts,
                                 model.model_config.max_new_tokens, min(batch_size, 16),
                                 bf16, stop_texts=getattr(form, "stop_texts", ()))  # fmt: skip
    return answer_metrics(predictions, [f["reference"] for f in feats],
                          [form.labels[f["labels"]] for f in feats], form.labels,
                          [f["instruction"] for f in feats], loss,
                          [f["context"] for f in feats])  # fmt: skip


def answer_metrics(
    predictions: Sequence[str], references: Sequence[str], categories: Sequence[str],
    labels: Sequence[str], instructions: Sequence[str], loss: float = float("nan"),
    contexts: Sequence[str] | None = None,
) -> Metrics:  # fmt: skip
    """Metrics of generated answers against references (any method that generates)."""
    from fedtune.evaluate import Metrics

    scores = score_texts(predictions, references)
    values, per = summarize_scores(scores, categories, labels)
    contexts = contexts or [""] * len(predictions)
    samples = [{"instruction": i, "context": x, "reference": r, "prediction": p, "category": c}
               for i, x, r, p, c in zip(instructions, contexts, references, predictions,
                                        categories, strict=True)][:SAMPLES]  # fmt: skip
    answers = [{"instruction": i, "category": c, "reference": r, "prediction": p, **s}
               for i, c, r, p, s in zip(instructions, categories, references, predictions,
                                        scores, strict=True)]  # fmt: skip
    return Metrics(loss=loss, n=len(predictions), values=values, primary="rougeL", report=per,
                   samples=samples, answers=answers,
                   per_example=[s["rougeL"] for s in scores])  # fmt: skip
