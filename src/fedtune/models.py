"""Base models and tokenizers: Hub ids, local directories, the bundled `minilm`
alias, and tiny random models built from configs for offline tests.

Two kinds of base model, decided from the model's config:
- `encoder` (BERT-like): loaded with a sequence-classification head;
- `decoder` (GPT-2, Llama, Qwen…): loaded as a causal LM, used as a generative
  classifier (fedtune.classify.GenerativeClassifier).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.errors import ModelError

Kind = Literal["encoder", "decoder"]
Pooling = Literal["cls", "mean"]


# Model families that are encoders even though transformers also offers a causal-LM
# head for some of them (e.g. BertLMHeadModel).
_ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta",
    "deberta-v2", "mpnet", "camembert", "modernbert", "ernie", "nomic_bert",
}  # fmt: skip


def resolve_model_name(name: str) -> str:
    """A catalog name (`minilm`, `mpnet`, `smollm2`, `gemma3`: fedtune.catalog) or a
    `.gguf` file -> the transformers folder it stands for; offline, the Hub id of an
    installed catalog model whose packaged weights are the Hub's own
    (`sentence-transformers/all-MiniLM-L6-v2`; not the requantized decoders, whose Hub
    id means the original weights). Hub ids and folders are returned unchanged."""
    from fedtune import catalog

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if offline:
        for entry in catalog.CATALOG.values():
            if name == entry.model and entry.exact and entry.installed():
                name = entry.name
    resolved = catalog.resolve(name)
    return name if resolved is None else resolved


def cache_root() -> Path:
    """fedtune's on-disk cache: $FEDTUNE_CACHE_DIR, else ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "fedtune")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def labelled_base(model: PreTrainedModel) -> Path:
    """A folder that loads as `model`'s base with its labels: the base's config with
    `id2label`/`label2id` (so `num_labels`), next to links to the base's own weight
    files. Kept in fedtune's cache under `bases/`, keyed by the weights and labels.

    Why: a PEFT adapter records only `base_model_name_or_path`, and
    `AutoPeftModelForSequenceClassification.from_pretrained(adapter)` builds the base
    from that folder's config alone, which says nothing of the task: 2 labels named
    LABEL_0/1 and a head the saved one does not fit. PEFT has no place for labels
    (huggingface/peft#1486), so the adapter names this folder as its base instead.
    Nothing is copied unless links are impossible (the weights stay where they are)."""
    from transformers.utils import cached_file

    source = str(model.name_or_path)
    weights: list[Path] = []
    for filename in _WEIGHT_FILES:
        found = cached_file(source, filename, _raise_exceptions_for_missing_entries=False)
        if found is None:
            continue
        weights = [Path(found)]
        if filename.endswith(".index.json"):
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            weights += [Path(found).with_name(shard) for shard in shards]
        break
    if not weights:
        raise ModelError(
            f"cannot find the weights of base model {source!r} ({', '.join(_WEIGHT_FILES)}) "
            "to record its labels next to a saved adapter; save the model with method `full`"
        )
    real = [w.resolve() for w in weights]
    id2label: dict[Any, Any] = dict(model.config.id2label or {})
    labels = [str(id2label[i]) for i in sorted(id2label, key=int)]
    key = hashlib.sha256(
        json.dumps([[str(r), r.stat().st_size] for r in real] + [labels]).encode()
    ).hexdigest()[:16]
    folder = cache_root() / "bases" / key
    if (folder / "config.json").is_file() and all(
        (folder / w.name).exists() for w in weights  # links into a cache someone cleared
    ):
        return folder
    if folder.exists():  # its links point into a cache someone cleared: make it again
        discard(folder)
    with staged_folder(folder, "config.json") as staging:
        for original, target in zip(weights, real, strict=True):
            try:
                (staging / original.name).symlink_to(target)
            except OSError:  # no symlinks here (some Windows setups): copy once
                shutil.copy2(target, staging / original.name)
        model.config.save_pretrained(staging)  # config.json last: the folder is complete
    return folder


@contextmanager
def staged_folder(target: Path, marker: str) -> Iterator[Path]:
    """Write a cache folder all or nothing: the block fills a hidden sibling, which
    becomes `target` when the block ends without an error and is removed otherwise.
    `marker` is the file the block writes last; a `target` without it (a folder half
    deleted by hand, an older layout) is replaced, and a complete one that another
    process renamed into place first is kept (it is the same)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide a shared cache
        try:
            staging.rename(target)
        except OSError:
            if (target / marker).is_file():
                return
            discard(target)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def discard(folder: Path) -> None:
    """Remove a cache folder: first renamed aside (one step), so that no reader ever
    sees it half deleted."""
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.stale-"))
    folder.rename(aside / "old")
    shutil.rmtree(aside, ignore_errors=True)


def load_config(name: str) -> PretrainedConfig:
    path = resolve_model_name(name)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise ModelError(
            f"cannot load model {name!r}: not a local model directory and not reachable "
            f"on the Hugging Face Hub ({e.__class__.__name__}). Pass a directory holding "
            "config.json, a Hub id while online, or `minilm` for the bundled model."
        ) from e


def detect_kind(config: PretrainedConfig) -> Kind:
    """Encoder or decoder, from `architectures` first, then the model type."""
    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if config.model_type in _ENCODER_TYPES or getattr(config, "is_encoder_decoder", False):
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "decoder" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"


def load_tokenizer(name: str, kind: Kind) -> PreTrainedTokenizerBase:
    path = resolve_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {e}") from e
    if kind == "decoder":
        # Causal LMs often ship without a pad token; padding positions are masked
        # out of attention and loss, so any id works. Right padding keeps the
        # prompt at positions 0..n-1, where the label scoring expects it.
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "right"
    return tok


def load_base_model(
    name: str, kind: Kind, labels: tuple[str, ...], dtype: torch.dtype = torch.float32,
    head: str = "auto",
) -> PreTrainedModel:  # fmt: skip
    """The pretrained model with the right head: sequence classification with
    `len(labels)` outputs for encoders, the causal LM for decoders; `head="score"`: one
    scalar output per sequence for either (a reward model; a new, random head)."""
    path = resolve_model_name(name)
    try:
        if head == "score":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, id2label={0: "reward"}, label2id={"reward": 0}, dtype=dtype
            )
        elif kind == "encoder":
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                dtype=dtype,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ModelError(f"cannot load model weights of {name!r}: {e}") from e
    if kind == "decoder" and model.config.pad_token_id is None:
        # Also where a score head finds each sequence's last token (the last non-pad one).
        model.config.pad_token_id = model.config.eos_token_id
    return model


def _mean_pool_hook(
    encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """Forward hook on the encoder: replace its `pooler_output` (BERT: the [CLS]
    token's state through dense + tanh) by the mean of the last hidden states over
    the real tokens. The attention mask may be longer than the hidden states when a
    prompt-learning method prepends virtual tokens to the mask only; its last T
    columns are the tokens'."""
    hidden = output.last_hidden_state  # [B, T, H]
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    weights = mask[:, -hidden.shape[1] :].to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
    output.pooler_output = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [B, H]
    return output


def set_pooling(model: PreTrainedModel, pooling: Pooling, kind: Kind) -> PreTrainedModel:
    """What the sequence-classification head of an encoder reads: `cls` leaves the
    model as transformers built it; `mean` feeds it the masked mean of the last
    hidden states instead — how sentence-transformers checkpoints such as
    all-MiniLM-L6-v2 were trained (their BERT pooler is never trained: all-MiniLM-L6-v2
    ships it with zero bias and small random weights). No weights change, so a saved
    adapter or model stays loadable by plain transformers/PEFT, which then pool
    with the [CLS] token again: use fedtune to predict with such a model.

    Works for heads that read the encoder's `pooler_output` (BERT, ALBERT, ERNIE…)."""
    if pooling == "cls":
        return model
    if kind == "decoder":
        raise ModelError(
            f"pooling = {pooling!r} applies to encoders (a classification head); a decoder "
            "classifies by generating the label word: use pooling = 'cls'"
        )
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ModelError(
            f"pooling = {pooling!r} needs an encoder whose classification head reads the "
            f"pooler output (BERT-like); {type(model).__name__} has none: use pooling = 'cls'"
        )
    if not getattr(encoder, "_fedtune_mean_pooling", False):  # idempotent
        encoder.register_forward_hook(_mean_pool_hook, with_kwargs=True)
        encoder._fedtune_mean_pooling = True  # type: ignore[assignment]
    return model


# --- tiny random models for tests (offline) ----------------------------------

_CORPUS_LINES = (
    "the company said its net sales rose fell increased decreased by percent in quarter year",
    "profit loss operating revenue million euro eur mn shares market group finnish bank",
    "will be to of and a an for with from on at as is was were has have its their",
    "positive negative neutral sentence sentiment label text review good bad service",
    "customers new contract order agreement growth decline stable expected compared",
    "period same last first second third fourth cash flow dividend price stock",
)
_CORPUS_WORDS = " ".join(_CORPUS_LINES).split()


def _corpus() -> list[str]:
    words = list(_CORPUS_WORDS)
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 6)]
    lines += ["Sentence: the profit rose.\nSentiment: positive", "0 1 2 3 4 5 6 7 8 9 %"]
    return lines + [w.capitalize() for w in words]


def _tiny_tokenizer(kind: Literal["wordpiece", "bpe"], out: Path) -> None:
    """Train a small tokenizer on a built-in corpus (the `tokenizers` library) and
    save it in transformers format, so tests never download a vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        # Not `WordPieceTrainer`: its vocabulary changes from one process to the next
        # (ties broken in hash order; 288 or 289 entries on the same corpus), so the
        # tiny BERT, and every test on it, differed between runs. Here the vocabulary
        # is a function of the corpus: the specials, every character of the corpus and
        # of printable ASCII alone and as a continuation, then the corpus's words, most
        # frequent first, ties by spelling.
        normalizer = normalizers.BertNormalizer(lowercase=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        counts = Counter(
            word
            for line in _corpus()
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
        )
        chars = sorted({c for word in counts for c in word} | set(string.printable.strip()))
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        entries = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        entries += chars + [f"##{c}" for c in chars]
        entries += words[: max(0, 400 - len(entries))]
        vocab = {token: i for i, token in enumerate(entries)}
        tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tk.normalizer = normalizer
        tk.pre_tokenizer = pre_tokenizer
        tk.decoder = decoders.WordPiece()
        from tokenizers.processors import TemplateProcessing

        cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
        tk.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )  # fmt: skip
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(
            _corpus(),
            trainers.BpeTrainer(
                vocab_size=500,
                special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        # Like GPT-2: one special token that is bos and eos, and no pad token.
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
    fast.save_pretrained(out)


def build_tiny_model(
    out_dir: str | Path, family: Literal["bert", "gpt2", "llama", "qwen2"] = "bert", seed: int = 0
) -> str:
    """Write a tiny randomly initialised model + tokenizer to `out_dir` (a few
    hundred kB) that loads with `from_pretrained` like any Hub model."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _tiny_tokenizer("wordpiece" if family == "bert" else "bpe", out)
    tok = AutoTokenizer.from_pretrained(out)
    vocab = len(tok)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if family == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                architectures=["BertModel"],
            )
        )  # fmt: skip
    elif family == "gpt2":
        eos = tok.eos_token_id
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                bos_token_id=eos, eos_token_id=eos, architectures=["GPT2LMHeadModel"],
            )
        )  # fmt: skip
    else:  # Llama-style decoders: Llama (untied LM head) and Qwen2 (tied)
        eos = tok.eos_token_id
        shape = dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
        if family == "qwen2":
            model = Qwen2ForCausalLM(
                Qwen2Config(**shape, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
            )
        else:
            model = LlamaForCausalLM(
                LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
            )
    model.save_pretrained(out)
    (out / "fedtune_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return str(out)
