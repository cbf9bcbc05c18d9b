"""Client for OpenAI-compatible chat-completions endpoints.

Frozen-model methods (in-context learning, retrieval-augmented prompting) send prompts
to a model that fedtune does not load itself: a local vLLM, Ollama or llama.cpp server,
or a hosted service. All of them speak the same `POST {base_url}/chat/completions`
protocol, so one small synchronous client covers them:

    endpoint = Endpoint.from_env(base_url="http://127.0.0.1:8000/v1", model="qwen2.5-7b")
    with ChatClient(endpoint) as chat:
        answer = chat.complete([{"role": "user", "content": "..."}], max_tokens=4)
    label = parse_label(answer, ("negative", "neutral", "positive"))

Where the server returns log-probabilities, `first_token_logprobs` and
`label_logprobs` score label words instead of parsing an answer:

    with ChatClient(endpoint) as chat:
        top = chat.first_token_logprobs(messages, top=20)
    scores = label_logprobs(top, ("negative", "neutral", "positive"))   # [3]

Many requests at once (`map_requests`): one client serves several threads, so a
server that batches requests (vLLM, llama.cpp's server with `--parallel`, a hosted API)
answers them together; results come back in the order asked.

Failures become `EndpointError`s that name the URL, what went wrong and the fix.
Transient failures (connection errors, timeouts, 408/409/429/5xx) are retried with
bounded exponential backoff; request errors (400/401/403/404/422) fail at once, since
repeating the same request cannot fix them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np

from fedtune.errors import EndpointError

log = logging.getLogger("fedtune.remote")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
"""HTTP statuses that say "try again later" rather than "this request is wrong"."""
MAX_SLEEP = 8.0
"""Cap on any single wait between attempts (backoff or Retry-After), so that total
sleep is at most `retries * MAX_SLEEP` whatever the server asks for."""
EXCERPT_CHARS = 200
"""How much of a response body an error message quotes."""

_CHAT_PATH = "/chat/completions"


@dataclass(frozen=True)
class Endpoint:
    """Where the model is served and how patiently to talk to it."""

    base_url: str
    """e.g. `http://127.0.0.1:8000/v1`; a trailing slash is tolerated and
    `/chat/completions` is appended (unless the URL already ends with it)."""
    model: str
    """The model name the server serves (vLLM: `--served-model-name`; Ollama: the tag)."""
    api_key: str = ""
    """Sent as `Authorization: Bearer ...` when non-empty; local servers need none."""
    timeout: float = 30.0
    """Seconds per HTTP request (connect, and each read of the response)."""
    retries: int = 3
    """Extra attempts after the first, for retryable failures only."""
    backoff: float = 0.5
    """Seconds; retry i (from 0) waits `backoff * 2**i`, capped at 8 s. A
    `Retry-After: <seconds>` header replaces that wait (also capped at 8 s)."""

    def __post_init__(self) -> None:
        # Checked here rather than at the first request so that a typo in a config
        # fails before any (possibly long) work that precedes the first call.
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise EndpointError(
                f"method.base_url (--base-url) {self.base_url!r} is not an http(s) "
                "URL; expected e.g. http://127.0.0.1:8000/v1"
            )
        if self.timeout <= 0:
            raise EndpointError(f"method.timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise EndpointError(f"method.retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise EndpointError(f"the backoff must be >= 0 seconds, got {self.backoff}")

    @property
    def url(self) -> str:
        """The chat-completions URL requests are POSTed to."""
        base = self.base_url.rstrip("/")
        # Users often paste the full URL from a server's docs; don't double the path.
        return base if base.endswith(_CHAT_PATH) else base + _CHAT_PATH

    @classmethod
    def from_env(
        cls,
        base_url: str = "",
        model: str = "",
        api_key_env: str = "OPENAI_API_KEY",
        **kw: Any,
    ) -> Endpoint:
        """Build an endpoint from config values, falling back to the environment.

        `base_url` falls back to `$OPENAI_BASE_URL`; the key is read from the env var
        named `api_key_env` (empty when unset: local servers need no key). Other
        keyword arguments (timeout, retries, backoff) pass through.
        """
        base_url = base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not base_url:
            raise EndpointError(
                "no model endpoint configured: set method.base_url (--base-url), e.g. "
                "http://127.0.0.1:8000/v1, or the OPENAI_BASE_URL environment variable"
            )
        if not model:
            raise EndpointError(
                f"no model name configured for {base_url}: set method.api_model "
                f"(--api-model) to a model the server serves "
                f"(GET {base_url.rstrip('/')}/models lists them)"
            )
        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        return cls(base_url=base_url, model=model, api_key=api_key, **kw)


class ChatClient:
    """Synchronous chat-completions client with retries; one per endpoint.

    `stats` counts `requests` (HTTP attempts sent), `retries` (attempts after a
    retryable failure) and `failures` (`complete` calls that raised EndpointError).
    One client may be used from several threads at once (`map_requests`): httpx's
    client is thread-safe and the counters are kept under a lock.
    """

    def __init__(self, endpoint: Endpoint, client: httpx.Client | None = None) -> None:
        self.endpoint = endpoint
        # A caller-supplied client (shared pool, custom transport in tests) is the
        # caller's to close; ours is closed by close().
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=endpoint.timeout)
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection pool (only if this client created it)."""
        if self._owns_client:
            self._client.close()

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> str:
        """Send one chat request; return the assistant's text (may be empty).

        Raises EndpointError when the server is unreachable, rejects the request,
        answers with something that is not a chat completion, or keeps failing
        after `endpoint.retries` extra attempts.
        """
        payload: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        # Some servers reject an empty stop list, so only send one that says something.
        if stop:
            payload["stop"] = stop
        try:
            return _content(*self._post(payload))
        except EndpointError:
            self._count("failures")
            raise

    def first_token_logprobs(
        self, messages: list[dict[str, str]], *, top: int = 20
    ) -> dict[str, float]:
        """The `top` most likely first tokens of the assistant's answer and their
        log-probabilities (`logprobs` / `top_logprobs` of the chat-completions API: OpenAI,
        vLLM, llama.cpp's server). One token is generated, greedily. Tokens that decode
        to the same text are merged (their probabilities added).

        Raises EndpointError as `complete` does, and when the server refuses the
        fields (HTTP 400/422) or answers without log-probabilities (`transformers
        serve` 5.24 ignores the fields): the message names `method.remote_scoring =
        "text"` as the fix.
        """
        payload: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": top,
        }
        hint = (
            "; the server may not give log-probabilities (the logprobs and top_logprobs "
            f"fields; some cap top_logprobs below the {top} asked: lower "
            'method.top_logprobs): set method.remote_scoring = "text" to parse answers instead'
        )
        try:
            return _top_logprobs(*self._post(payload, hint), hint)
        except EndpointError:
            self._count("failures")
            raise

    def _post(self, payload: dict[str, Any], request_hint: str = "") -> tuple[str, httpx.Response]:
        """POST with retries -> (url, the successful response). `request_hint` is added
        to the message of a request error (400/422)."""
        ep = self.endpoint
        url = ep.url
        headers = {"Accept": "application/json"}
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        attempts = ep.retries + 1
        last = ""  # the last retryable failure, for the give-up message
        hint = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            self._count("requests")
            try:
                # The per-request timeout also applies to a caller-supplied client,
                # whose own default might be "no timeout": never hang.
                resp = self._client.post(url, json=payload, headers=headers, timeout=ep.timeout)
            except httpx.TimeoutException:
                last = f"no response within {ep.timeout:g} s (timeout)"
                hint = (
                    "The server may be overloaded or still loading the model; "
                    "raise method.timeout or check the server"
                )
            except httpx.TransportError as exc:
                # ConnectError (refused, DNS), dropped connections, protocol errors.
                last = f"server unreachable ({type(exc).__name__}: {exc or 'no detail'})"
                hint = "Is the server running? Check method.base_url (--base-url)"
            else:
                if resp.is_success:
                    return url, resp
                if resp.status_code not in RETRY_STATUSES:
                    extra = request_hint if resp.status_code in (400, 422) else ""
                    raise EndpointError(_fatal_message(ep, resp) + extra)
                last = f"HTTP {resp.status_code}: {_excerpt(resp)}"
                hint = (
                    "The server is rate-limiting requests; lower the request rate"
                    if resp.status_code == 429
                    else "The server is failing or overloaded; check its logs"
                )
                retry_after = _retry_after(resp)
            if attempt + 1 < attempts:
                wait = retry_after if retry_after is not None else ep.backoff * 2**attempt
                wait = min(wait, MAX_SLEEP)
                log.warning(
                    "%s: %s; retry %d/%d in %.2f s", url, last, attempt + 1, ep.retries, wait
                )
                self._count("retries")
                time.sleep(wait)
        plural = "s" if attempts != 1 else ""
        raise EndpointError(
            f"{url}: gave up after {attempts} attempt{plural}; last failure: {last}. {hint}"
        )


T = TypeVar("T")
R = TypeVar("R")


class _Skipped(Exception):
    """A call not made because an earlier one failed (map_requests)."""


def map_requests(fn: Callable[[T], R], items: Sequence[T], concurrency: int) -> list[R]:
    """`[fn(x) for x in items]` with up to `concurrency` calls in flight at once
    (threads: each call waits on the network). Results keep the order of `items`. After
    the first exception no call starts (the ones in flight end), and the exception of
    the earliest item that failed is raised: a dead or refusing server costs about
    `concurrency` requests, not one per item. The first call runs alone, so that a
    server that is down or refuses every request fails once (one series of retries),
    not once per call in flight. 1: a plain loop."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if concurrency == 1 or len(items) <= 2:
        return [fn(x) for x in items]
    first, items = fn(items[0]), items[1:]
    failed = threading.Event()

    def call(x: T) -> R:
        if failed.is_set():
            raise _Skipped
        try:
            return fn(x)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(min(concurrency, len(items)), thread_name_prefix="fedtune-remote")
    futures = [pool.submit(call, x) for x in items]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:  # Ctrl-C while waiting: start nothing more
        failed.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for f in futures:
        if not f.cancelled() and not isinstance(f.exception(), _Skipped | None):
            raise f.exception()  # type: ignore[misc]
    return [first, *(f.result() for f in futures)]


def _content(url: str, resp: httpx.Response) -> str:
    """choices[0].message.content of a successful response, or EndpointError."""
    data = _json(url, resp)
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(
            f"{url} answered HTTP {resp.status_code} without choices[0].message.content: "
            f"{_excerpt(resp)}. Is method.base_url (--base-url) an OpenAI-compatible "
            "chat-completions API?"
        ) from None
    # Reasoning models may spend all of max_tokens on hidden reasoning and return
    # null content; that is an empty answer (unparseable label), not a broken server.
    if content is None:
        return ""
    if not isinstance(content, str):
        raise EndpointError(
            f"{url} returned non-text message content ({type(content).__name__}): "
            f"{_excerpt(resp)}"
        )
    return content


def _json(url: str, resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise EndpointError(
            f"{url} answered HTTP {resp.status_code} with a body that is not JSON: "
            f"{_excerpt(resp)}. Is method.base_url (--base-url) an OpenAI-compatible API "
            "(usually ending in /v1)?"
        ) from None


LOGPROB_FLOOR = -1e4
"""What a listed token's log-probability becomes when the server sends none that is
finite (null, -Infinity or NaN; vLLM clamps to -9999 itself)."""


def _token_text(entry: dict[str, Any]) -> str:
    """A top_logprobs entry's text: its UTF-8 `bytes` when given (the `token` string of
    a piece that splits a character is lossy: U+FFFD, a cut prefix or a placeholder),
    with the incomplete character dropped; else `token`; "" when neither is usable."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and raw and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw).decode("utf-8", "ignore")
    token = entry.get("token")
    return token if isinstance(token, str) else ""


def _top_logprobs(url: str, resp: httpx.Response, hint: str) -> dict[str, float]:
    """choices[0].logprobs.content[0].top_logprobs of a response as {token text:
    log-probability}; {} when the answer has no token (it ended at once). EndpointError
    when the response carries no log-probabilities at all."""
    data = _json(url, resp)
    try:
        content = data["choices"][0]["logprobs"]["content"]
        entries = content[0]["top_logprobs"] if content else []
        pairs = [(_token_text(e), e["logprob"]) for e in entries]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise EndpointError(
            f"{url} answered HTTP {resp.status_code} without "
            f"choices[0].logprobs.content[0].top_logprobs: {_excerpt(resp)}{hint}"
        ) from None
    out: dict[str, float] = {}
    for token, value in pairs:
        try:
            logprob = float(value)
        except (TypeError, ValueError):
            logprob = LOGPROB_FLOOR
        logprob = logprob if math.isfinite(logprob) else LOGPROB_FLOOR
        out[token] = float(np.logaddexp(out[token], logprob)) if token in out else logprob
    return out


def label_logprobs(top: dict[str, float], words: tuple[str, ...]) -> np.ndarray:
    """Label scores [K] from the first answer token's top log-probabilities: each label
    gets the log of the summed probability of the listed tokens that begin its label
    word (case, surrounding spaces and punctuation ignored: "Neg", " negative",
    "ĠNegative" and "NEGATIVE" all begin "negative"). A token that is a whole label
    word counts for that label ("no" for no, not for "not sure"); one that only begins
    several words ("ne" for negative and neutral) counts for none, nor does one that is
    only space or punctuation. A label with no listed token gets the smallest listed
    log-probability minus ln 2: its probability is at most that one's, and a label
    that is listed stays ahead of one that is not. When no label is listed (or nothing
    is) every score is equal (no label preferred: counted as unparseable).

    Written here because the label words of a classifier are scored from a server's
    top-k list, which no client library does (lm-evaluation-harness scores whole
    continuations, which chat-completions servers cannot)."""
    if not top:
        return np.zeros(len(words), np.float32)
    names = [normalize_answer(w) for w in words]
    floor = min(top.values()) - math.log(2)
    scores = np.full(len(words), -np.inf)
    for token, logprob in top.items():
        # Servers that list raw vocabulary pieces mark a leading space as "Ġ" (byte BPE)
        # or "▁" (SentencePiece) at the start; decoded text has the space itself.
        t = normalize_answer(re.sub(r"^[Ġ▁]", " ", token))
        if not t:
            continue
        hits = [k for k, name in enumerate(names) if name == t] or [
            k for k, name in enumerate(names) if name.startswith(t)
        ]
        if len(hits) == 1:
            scores[hits[0]] = np.logaddexp(scores[hits[0]], logprob)
    return np.where(np.isfinite(scores), scores, floor).astype(np.float32)


def _fatal_message(ep: Endpoint, resp: httpx.Response) -> str:
    """Message for a status that retrying cannot fix, with the likely fix."""
    code = resp.status_code
    what = f"{ep.url} answered HTTP {code}: {_excerpt(resp)}."
    if code in (401, 403):
        if ep.api_key:
            fix = "The API key was rejected; check OPENAI_API_KEY (or the key variable configured)"
        else:
            fix = "No API key was sent; set OPENAI_API_KEY (or the key variable configured)"
    elif code == 404:
        fix = (
            f"Check method.base_url (--base-url; usually ending in /v1) and "
            f"method.api_model (--api-model; {ep.model!r}: "
            f"GET {ep.base_url.rstrip('/')}/models lists the served models)"
        )
    elif code in (400, 422):
        fix = (
            f"The server rejected the request; check the model name ({ep.model!r}) and "
            "that max_tokens plus the prompt fit the model's context"
        )
    else:
        fix = "Check method.base_url (--base-url) and the server's logs"
    return f"{what} {fix}"


def _excerpt(resp: httpx.Response) -> str:
    """A short, one-line quote of a response body; its error message when it has one."""
    text = ""
    try:
        data = resp.json()
    except ValueError:
        data = None
    # OpenAI/vLLM: {"error": {"message": ...}}; Ollama: {"error": "..."};
    # FastAPI-based servers: {"detail": ...}.
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            text = str(err)
    if not text:
        text = resp.text
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    if len(text) > EXCERPT_CHARS:
        text = text[:EXCERPT_CHARS] + "..."
    return repr(text)


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds from a numeric Retry-After header; None when absent or not a number."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare for APIs, and the backoff is a fine wait
    return max(0.0, seconds)


# Quotes and punctuation models wrap answers in: "Positive.", **negative**, `neutral`.
_STRIP = string.whitespace + string.punctuation + "“”‘’«»"


def normalize_answer(text: str) -> str:
    """Lowercase, trim quotes/punctuation, and treat `_` and runs of spaces as one space."""
    text = text.replace("_", " ").lower()
    return " ".join(text.split()).strip(_STRIP)


def _spans(answer: str, name: str) -> list[tuple[int, int]]:
    # Whole-word occurrences; lookarounds rather than \b so names that start or
    # end with punctuation ("n/a", "yes.") still match.
    pattern = rf"(?<!\w){re.escape(name)}(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, answer)]


def parse_label(answer: str, labels: tuple[str, ...], words: tuple[str, ...] = ()) -> str | None:
    """Map a model's free-text answer to one of `labels`, or None when unparseable.

    `words` (optional, one per label) are the label words the prompt showed the model;
    either a label or its word counts. Matching is case-insensitive and ignores
    surrounding whitespace, quotes and punctuation, in this order:

    1. the whole answer is a label (word): `"Positive."` -> positive;
    2. the answer starts with one: `"positive sentiment"` -> positive (the longest
       such word wins, so a label "very positive" beats "positive");
    3. exactly one label occurs as a whole word anywhere: `"Sentiment: negative"`;
       several different labels (`"positive or negative"`) or none -> None.

    Negation is not understood: `"not positive"` -> positive.
    """
    if words and len(words) != len(labels):
        raise ValueError(f"words has {len(words)} entries but labels has {len(labels)}")
    names: list[tuple[str, str]] = []  # (normalised name, label)
    for i, label in enumerate(labels):
        for name in {normalize_answer(label), normalize_answer(words[i]) if words else ""}:
            if name:
                names.append((name, label))
    text = normalize_answer(answer)
    if not text:
        return None
    for name, label in names:
        if text == name:
            return label
    prefixed = [(name, label) for name, label in names if (0, len(name)) in _spans(text, name)]
    if prefixed:
        return max(prefixed, key=lambda nl: len(nl[0]))[1]
    found = [(s, e, label) for name, label in names for s, e in _spans(text, name)]
    # An occurrence inside a longer one ("positive" within "very positive") is the
    # longer label's, not a second label.
    kept = {
        label
        for s, e, label in found
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in found)
    }
    return kept.pop() if len(kept) == 1 else None
