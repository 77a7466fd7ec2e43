"""`/tokenize` (spec 3.7) and the router-side tokenizer helpers the chat route relies on."""

from __future__ import annotations

import asyncio

import httpx
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from router.app import create_app
from router.chat_template import ChatTemplate
from router.infer import Infer
from router.metrics import Metrics
from router.model_tokenizer import ModelTokenizer
from router.schemas import Info
from router.state import AppConfig
from router.validation import TokenizerPool, ValidationLimits, Validator
from tests.test_router_support import router_stack, run, word_tokenizer

LIMITS = ("--max-input-length", "10", "--max-total-tokens", "20", "--max-batch-prefill-tokens", "40")


def bos_tokenizer() -> Tokenizer:
    """Whole words, with `[BOS]` added in front of every encoding."""
    vocab = {"[UNK]": 0, "[BOS]": 1, "héllo": 2, "wörld": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return tokenizer


def test_tokenize_route():
    async def scenario():
        async with router_stack(*LIMITS) as stack:
            reply = await stack.http.post("/tokenize", json={"inputs": "w1  w22 zz"})
            assert reply.status_code == 200
            assert reply.json() == [
                {"id": 2, "text": "w1", "start": 0, "stop": 2},
                {"id": 23, "text": "w22", "start": 4, "stop": 7},
                {"id": 0, "text": "[UNK]", "start": 8, "stop": 10},
            ]
            explicit = await stack.http.post("/tokenize", json={"inputs": "w1", "add_special_tokens": None})
            assert explicit.json() == [{"id": 2, "text": "w1", "start": 0, "stop": 2}]
            assert (await stack.http.post("/tokenize", json={"inputs": ""})).json() == []

    run(scenario())


def test_special_tokens_and_character_offsets():
    tokenizer = ModelTokenizer(bos_tokenizer())
    with_bos = asyncio.run(tokenizer.tokenize("héllo wörld"))
    assert [(t.id, t.text, t.start, t.stop) for t in with_bos] == [
        (1, "[BOS]", 0, 0), (2, "héllo", 0, 5), (3, "wörld", 6, 11)
    ]
    without = asyncio.run(tokenizer.tokenize("héllo wörld", add_special_tokens=False))
    assert [t.id for t in without] == [2, 3]


def test_chat_prompt_drops_a_bos_the_tokenizer_adds_itself():
    template = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}", bos_token="[BOS]")
    messages = [{"role": "user", "content": "héllo"}]
    assert ModelTokenizer(bos_tokenizer(), template).chat_prompt(messages) == "héllo"
    plain = word_tokenizer()
    plain.add_special_tokens(["[BOS]"])
    assert ModelTokenizer(plain, template).chat_prompt(messages) == "[BOS]héllo"


def test_no_tokenizer():
    info = Info(
        model_id="m", model_dtype="float32", model_device_type="cpu", max_concurrent_requests=1, max_best_of=1,
        max_stop_sequences=1, max_input_length=8, max_total_tokens=16, waiting_served_ratio=1.0,
        max_batch_total_tokens=16, max_waiting_tokens=1, validation_workers=1,
    )
    pool = TokenizerPool(word_tokenizer(), 1)

    def refuse(_):
        raise AssertionError("nothing may be queued")

    async def healthy() -> None:
        return None

    app = create_app(Infer(Validator(pool, ValidationLimits()), refuse, 1), healthy, AppConfig(info=info), Metrics())

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            reply = await http.post("/tokenize", json={"inputs": "w1"})
            assert reply.status_code == 404
            assert reply.json() == {"error": "No fast tokenizer or tokenizer.json for this model",
                                    "error_type": "no fast tokenizer"}
            chat = await http.post("/v1/chat/completions", json={"model": "", "messages": [{"role": "user"}]})
            assert chat.status_code == 422 and chat.json()["error_type"] == "template_error"

    try:
        run(scenario())
    finally:
        pool.close()
