"""The OpenAI-compatible chat client against a local stub server (offline, fast)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai_stub import OpenAIStub, closed_port_url

from fedtune.errors import EndpointError
from fedtune.remote import ChatClient, Endpoint, label_logprobs, parse_label

MSGS = [{"role": "user", "content": "Sentiment of: profit rose?"}]
LABELS = ("negative", "neutral", "positive")


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as s:
        yield s


def fast(url: str, **kw: Any) -> Endpoint:
    """An endpoint with test-sized timeouts and backoff."""
    opts: dict[str, Any] = {"timeout": 0.3, "retries": 3, "backoff": 0.01}
    opts.update(kw)
    return Endpoint(url, "stub-model", **opts)


def call(ep: Endpoint, **kw: Any) -> tuple[str, ChatClient]:
    with ChatClient(ep) as client:
        return client.complete(MSGS, **kw), client


# -- success path -----------------------------------------------------------------


def test_success_sends_openai_request(stub: OpenAIStub) -> None:
    stub.push(("ok", "Positive"))
    answer, client = call(fast(stub.url), max_tokens=4, stop=["\n"])
    assert answer == "Positive"
    assert client.stats == {"requests": 1, "retries": 0, "failures": 0}
    (req,) = stub.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.body == {
        "model": "stub-model",
        "messages": MSGS,
        "max_tokens": 4,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    assert "authorization" not in req.headers


def test_api_key_sent_as_bearer(stub: OpenAIStub) -> None:
    call(fast(stub.url, api_key="sk-test"))
    assert stub.requests[0].headers["authorization"] == "Bearer sk-test"
    assert "stop" not in stub.requests[0].body


def test_responder_sees_request(stub: OpenAIStub) -> None:
    stub.responder = lambda body: body["messages"][-1]["content"].upper()
    answer, _ = call(fast(stub.url))
    assert answer == MSGS[0]["content"].upper()


@pytest.mark.parametrize("suffix", ["", "/", "/chat/completions"])
def test_base_url_forms(stub: OpenAIStub, suffix: str) -> None:
    answer, _ = call(fast(stub.url + suffix))
    assert answer == "stub answer"
    assert stub.requests[0].path == "/v1/chat/completions"


def test_null_content_is_empty_answer(stub: OpenAIStub) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
    stub.push(("json", body))
    assert call(fast(stub.url))[0] == ""


def test_caller_supplied_client_is_not_closed(stub: OpenAIStub) -> None:
    with httpx.Client() as http:
        with ChatClient(fast(stub.url), client=http) as client:
            assert client.complete(MSGS) == "stub answer"
        assert not http.is_closed


# -- retries ----------------------------------------------------------------------


def test_retry_after_500(stub: OpenAIStub) -> None:
    stub.push(("status", 500), ("ok", "neutral"))
    answer, client = call(fast(stub.url))
    assert answer == "neutral"
    assert client.stats == {"requests": 2, "retries": 1, "failures": 0}
    assert len(stub.requests) == 2


def test_429_honours_retry_after(stub: OpenAIStub) -> None:
    # Backoff alone would wait 5 s; Retry-After: 0 must replace it.
    stub.push(("status", 429, {"Retry-After": "0"}), ("ok", "negative"))
    t0 = time.monotonic()
    answer, client = call(fast(stub.url, backoff=5.0))
    assert answer == "negative"
    assert client.stats["retries"] == 1
    assert time.monotonic() - t0 < 2.0


def test_retry_after_wait_is_used(stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("fedtune.remote.time.sleep", sleeps.append)
    stub.push(
        ("status", 429, {"Retry-After": "0.2"}),
        ("status", 503, {"Retry-After": "3600"}),  # capped at 8 s
        ("status", 502),  # no header: backoff * 2**2
        ("ok", "x"),
    )
    assert call(fast(stub.url, backoff=0.01))[0] == "x"
    assert sleeps == [0.2, 8.0, pytest.approx(0.04)]


def test_timeout_then_success(stub: OpenAIStub) -> None:
    stub.push(("sleep", 2.0, "too late"), ("ok", "positive"))
    t0 = time.monotonic()
    answer, client = call(fast(stub.url, timeout=0.2))
    assert answer == "positive"
    assert client.stats["retries"] == 1
    assert time.monotonic() - t0 < 1.5


def test_dropped_connection_is_retried(stub: OpenAIStub) -> None:
    stub.push(("drop",), ("ok", "neutral"))
    assert call(fast(stub.url))[0] == "neutral"


def test_persistent_503_gives_up(stub: OpenAIStub) -> None:
    stub.responder = lambda body: ("status", 503)
    client = ChatClient(fast(stub.url, retries=2))
    with client, pytest.raises(EndpointError, match=r"after 3 attempts.*HTTP 503.*error 503"):
        client.complete(MSGS)
    assert len(stub.requests) == 3
    assert client.stats == {"requests": 3, "retries": 2, "failures": 1}


def test_persistent_timeout_gives_up(stub: OpenAIStub) -> None:
    stub.responder = lambda body: ("sleep", 2.0)
    with pytest.raises(EndpointError, match=r"after 2 attempts.*timeout.*method.timeout"):
        call(fast(stub.url, timeout=0.2, retries=1))


# -- fatal statuses and bad bodies ----------------------------------------------------


def test_401_fails_at_once_naming_the_key(stub: OpenAIStub) -> None:
    stub.push(("status", 401, {}, {"error": {"message": "Invalid API key"}}))
    with pytest.raises(EndpointError, match=r"HTTP 401.*Invalid API key.*OPENAI_API_KEY"):
        call(fast(stub.url, api_key="sk-wrong"))
    assert len(stub.requests) == 1


def test_403_without_key_says_none_was_sent(stub: OpenAIStub) -> None:
    stub.push(("status", 403))
    with pytest.raises(EndpointError, match="No API key was sent; set OPENAI_API_KEY"):
        call(fast(stub.url))
    assert len(stub.requests) == 1


def test_404_wrong_base_url(stub: OpenAIStub) -> None:
    # The origin without /v1: the stub 404s like vLLM does.
    client = ChatClient(fast(stub.origin))
    pattern = r"HTTP 404.*method\.base_url.*method\.api_model"
    with client, pytest.raises(EndpointError, match=pattern):
        client.complete(MSGS)
    assert len(stub.requests) == 1
    assert client.stats == {"requests": 1, "retries": 0, "failures": 1}


@pytest.mark.parametrize("code", [400, 422])
def test_bad_request_not_retried(stub: OpenAIStub, code: int) -> None:
    stub.push(("status", code, {}, {"detail": "unknown model"}))
    with pytest.raises(EndpointError, match=rf"HTTP {code}.*unknown model.*model name"):
        call(fast(stub.url))
    assert len(stub.requests) == 1


def test_garbage_body(stub: OpenAIStub) -> None:
    stub.push(("garbage", b"<html>not json</html>"))
    with pytest.raises(EndpointError, match=r"not JSON.*<html>not json</html>"):
        call(fast(stub.url))
    assert len(stub.requests) == 1


def test_body_without_choices(stub: OpenAIStub) -> None:
    stub.push(("json", {"object": "list", "data": []}))
    with pytest.raises(EndpointError, match=r"without choices\[0\]\.message\.content"):
        call(fast(stub.url))
    assert len(stub.requests) == 1


def test_long_body_is_excerpted(stub: OpenAIStub) -> None:
    stub.push(("status", 400, {}, b"x" * 5000))
    with pytest.raises(EndpointError) as info:
        call(fast(stub.url))
    assert len(str(info.value)) < 600


def test_connection_refused_is_quick_and_clear() -> None:
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"after 4 attempts.*unreachable.*server running"):
        call(fast(url))
    assert time.monotonic() - t0 < 2.0


def test_stub_stops_cleanly_with_a_sleeping_handler() -> None:
    before = threading.active_count()
    with OpenAIStub() as stub:
        stub.push(("sleep", 30.0))
        with pytest.raises(EndpointError):
            call(fast(stub.url, timeout=0.1, retries=0))
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    assert threading.active_count() == before


# -- Endpoint ----------------------------------------------------------------------


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env-host:1234/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    ep = Endpoint.from_env(model="m", timeout=5.0)
    assert (ep.base_url, ep.model, ep.api_key, ep.timeout) == (
        "http://env-host:1234/v1",
        "m",
        "sk-env",
        5.0,
    )
    ep = Endpoint.from_env("http://cfg:1/v1/", "m", api_key_env="MY_KEY")
    assert (ep.base_url, ep.api_key) == ("http://cfg:1/v1/", "sk-mine")
    assert ep.url == "http://cfg:1/v1/chat/completions"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert Endpoint.from_env(model="m").api_key == ""


def test_from_env_missing_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(EndpointError, match=r"method\.base_url.*OPENAI_BASE_URL"):
        Endpoint.from_env(model="m")
    with pytest.raises(EndpointError, match=r"method\.api_model"):
        Endpoint.from_env("http://h/v1")


def test_endpoint_validation() -> None:
    with pytest.raises(EndpointError, match="not an http"):
        Endpoint("localhost:8000/v1", "m")
    with pytest.raises(EndpointError, match="timeout"):
        Endpoint("http://h/v1", "m", timeout=0)
    with pytest.raises(EndpointError, match="retries"):
        Endpoint("http://h/v1", "m", retries=-1)


# -- parse_label ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("positive", "positive"),  # exact
        ("NEGATIVE", "negative"),  # case
        ('  "Neutral."  \n', "neutral"),  # whitespace, quotes, punctuation
        ("**positive**", "positive"),  # markdown emphasis
        ("Positive sentiment", "positive"),  # prefix
        ("negative, because profits fell", "negative"),  # prefix with punctuation
        ("Negative. The neutral tone aside...", "negative"),  # prefix beats later labels
        ("The sentiment is neutral.", "neutral"),  # single embedded label
        ("Sentiment: positive", "positive"),
        ("positively", None),  # not a whole word
        ("either positive or negative", None),  # ambiguous
        ("I cannot tell", None),  # nothing
        ("", None),
        ("  ...  ", None),
    ],
)
def test_parse_label(answer: str, expected: str | None) -> None:
    assert parse_label(answer, LABELS) == expected


def test_parse_label_words() -> None:
    labels = ("0", "1", "2")
    words = ("bad", "okay", "good")
    assert parse_label("Good.", labels, words) == "2"
    assert parse_label("2", labels, words) == "2"  # the label itself still counts
    assert parse_label("it is okay I think", labels, words) == "1"
    assert parse_label("either bad or good", labels, words) is None
    assert parse_label("bad or good", labels, words) == "0"  # a leading label wins
    with pytest.raises(ValueError, match="words"):
        parse_label("good", labels, ("bad", "good"))


def test_parse_label_overlapping_and_underscores() -> None:
    labels = ("positive", "very positive", "not_equivalent")
    assert parse_label("very positive news", labels) == "very positive"
    assert parse_label("This is very positive.", labels) == "very positive"
    assert parse_label("Not equivalent", labels) == "not_equivalent"


# -- label scores from top log-probabilities -----------------------------------------


def test_first_token_logprobs_request_and_merge(stub: OpenAIStub) -> None:
    stub.push(("logprobs", {"Positive": -0.5, " positive": -2.0, "The": -1.5}))
    with ChatClient(fast(stub.url)) as client:
        top = client.first_token_logprobs(MSGS, top=5)
    assert top == {"Positive": -0.5, " positive": -2.0, "The": -1.5}
    assert stub.requests[0].body == {
        "model": "stub-model", "messages": MSGS, "max_tokens": 1, "temperature": 0.0,
        "logprobs": True, "top_logprobs": 5,
    }  # fmt: skip
    # Two token ids decoding to the same text: their probabilities add up.
    body = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
        {"token": "Neg", "logprob": math.log(0.2)}, {"token": "Neg", "logprob": math.log(0.3)},
    ]}]}}]}  # fmt: skip
    stub.push(("json", body))
    with ChatClient(fast(stub.url)) as client:
        assert client.first_token_logprobs(MSGS) == {"Neg": pytest.approx(math.log(0.5))}


def test_label_logprobs_sums_tokens_that_begin_a_label_word() -> None:
    top = {"Positive": math.log(0.4), " positive": math.log(0.1), "POS": math.log(0.05),
           "ne": math.log(0.2), "The": math.log(0.15), "Neutral": math.log(0.02)}  # fmt: skip
    scores = label_logprobs(top, LABELS)
    floor = math.log(0.02) - math.log(2)  # negative: not listed ("ne" is ambiguous)
    np.testing.assert_allclose(scores, [floor, math.log(0.02), math.log(0.55)], rtol=1e-6)
    # No label word begins with any listed token: all at the floor, no label preferred.
    none = label_logprobs({"The": -0.1, "I": -3.0}, LABELS)
    assert np.ptp(none) == 0 and none[0] == pytest.approx(-3.0 - math.log(2))
    # A token that is a whole label word is that label's, even if it begins another.
    yes_no = label_logprobs({"no": math.log(0.9), "not": math.log(0.05)}, ("no", "not_sure", "yes"))
    np.testing.assert_allclose(yes_no[:2], [math.log(0.9), math.log(0.05)], rtol=1e-6)
    # Nothing listed (an answer that ended at once): no label preferred.
    assert label_logprobs({}, LABELS).tolist() == [0.0, 0.0, 0.0]
    # Raw vocabulary pieces: the space marks of byte BPE and SentencePiece.
    raw = label_logprobs({"ĠNegative": -0.5, "▁neutral": -1.5, "Ġ": -2.0}, LABELS)
    np.testing.assert_allclose(raw, [-0.5, -1.5, -2.0 - math.log(2)], rtol=1e-6)
    # Label words, not label names, are what the tokens begin.
    words = label_logprobs({"bad": -0.2, "good": -1.0}, ("bad", "so-so", "good"))
    assert words.argmax() == 0 and words[2] == pytest.approx(-1.0)


def test_first_token_logprobs_odd_entries(stub: OpenAIStub) -> None:
    """Non-finite or null log-probabilities become a floor; `bytes` decide a token's
    text (a piece that splits a character has a lossy `token`); an answer with no
    token gives nothing listed."""
    entries = [
        {"token": "Pos", "logprob": float("-inf")},
        {"token": "Neg", "logprob": None},
        {"token": None, "logprob": -0.5, "bytes": list(b"neu")},
        {"token": "n\ufffd", "logprob": -1.0, "bytes": [110, 195]},  # "n" + half of "é"
    ]
    stub.push(("json", {"choices": [{"logprobs": {"content": [{"top_logprobs": entries}]}}]}))
    stub.push(("json", {"choices": [{"logprobs": {"content": []}}]}))
    with ChatClient(fast(stub.url)) as client:
        top = client.first_token_logprobs(MSGS)
        assert top == {"Pos": -1e4, "Neg": -1e4, "neu": -0.5, "n": -1.0}
        assert client.first_token_logprobs(MSGS) == {}
    scores = label_logprobs(top, ("négatif", "neutral", "positive"))
    assert scores.argmax() == 1 and np.isfinite(scores).all()


@pytest.mark.parametrize("code", [400, 422])
def test_logprobs_refused_or_ignored_names_the_text_fallback(stub: OpenAIStub, code: int) -> None:
    # A server may refuse the fields (400/422) or ignore them (transformers serve 5.24).
    refusal = {"detail": "Unsupported fields in the request: {'top_logprobs'}"}
    stub.push(("status", code, {}, refusal))
    stub.push(("ok", "Positive"))
    with ChatClient(fast(stub.url)) as client:
        with pytest.raises(EndpointError, match=rf"HTTP {code}.*Unsupported fields.*lower "
                           r'method\.top_logprobs.*remote_scoring = "text"'):  # fmt: skip
            client.first_token_logprobs(MSGS)
        with pytest.raises(EndpointError, match=r"without choices\[0\]\.logprobs.*remote_scoring"):
            client.first_token_logprobs(MSGS)
        assert client.stats["failures"] == 2
    assert len(stub.requests) == 2  # neither is retried
    # Other failures say nothing about log-probabilities.
    stub.push(("status", 404))
    with ChatClient(fast(stub.url)) as client, pytest.raises(EndpointError) as err:
        client.first_token_logprobs(MSGS)
    assert "remote_scoring" not in str(err.value)


# --- map_requests ------------------------------------------------------------------


def test_map_requests_keeps_order_and_stops_at_the_first_error() -> None:
    from fedtune.remote import map_requests

    def slow(i: int) -> int:
        time.sleep(0.02 * (5 - i % 5))  # later items finish first
        return i * i

    assert map_requests(slow, list(range(10)), 4) == [i * i for i in range(10)]
    assert map_requests(slow, [3], 8) == [9] and map_requests(slow, [], 4) == []
    started: list[int] = []
    lock = threading.Lock()

    def fail(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.05)
        raise EndpointError(f"item {i}")

    with pytest.raises(EndpointError, match="item 0"):
        map_requests(fail, list(range(40)), 2)
    assert started == [0]  # the first call runs alone: a dead server fails once
    started.clear()
    with pytest.raises(EndpointError, match="item 1"):
        map_requests(lambda i: 0 if i == 0 else fail(i), list(range(40)), 2)
    assert len(started) <= 4  # 2 in flight and a race each: nothing starts after a failure
    # A slow first item does not hide a failure behind it: the failure stops the rest
    # at once, and the error raised is that of the earliest item that failed.
    started.clear()

    def second_fails(i: int) -> int:
        with lock:
            started.append(i)
        if i == 0:
            time.sleep(0.5)
            return 0
        raise EndpointError(f"item {i}")

    with pytest.raises(EndpointError, match="item 1"):
        map_requests(second_fails, list(range(200)), 2)
    assert len(started) <= 6
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        map_requests(slow, [1, 2], 0)


def test_a_remote_icl_is_refused_a_federated_run_on_both_tasks() -> None:
    """A site would send its demonstrations to the endpoint the run's config names:
    federating a remote icl is refused on both tasks, with the fix named (the reason
    `fedtune compare` prints when it skips that regime)."""
    from fedtune.config import load_config
    from fedtune.federated.apps import query_refusal

    for task in ("classification", "generation"):
        remote = load_config(None, ["method.name=icl", "method.backend=remote",
                                    f"data.task={task}"])  # fmt: skip
        assert 'method.backend = "local"' in query_refusal(remote)
        local = load_config(None, ["method.name=icl", f"data.task={task}"])
        assert query_refusal(local) == ""
    assert query_refusal(load_config(None, ["method.name=lora"])) == ""
