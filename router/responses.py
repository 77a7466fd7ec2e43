"""Build response bodies and headers from generation results (spec 3.4, 3.5, 3.10)."""

from __future__ import annotations

import string
import time
from urllib.parse import quote

from router.infer import GenerationResult
from router.queue import EndEvent
from router.schemas import (
    BestOfSequence,
    Details,
    GenerateParameters,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from router.validation import ValidRequest


def _text(request: ValidRequest, generated: str) -> str:
    return request.inputs + generated if request.return_full_text else generated


def generate_response(request: ValidRequest, results: list[GenerationResult]) -> GenerateResponse:
    """`results` best first; details iff `details` or `decoder_input_details` was asked for."""
    best = results[0]
    text = _text(request, best.end.generated_text)
    if not (request.details or request.decoder_input_details):
        return GenerateResponse(generated_text=text)
    best_of_sequences = None
    if request.best_of > 1:
        best_of_sequences = [
            BestOfSequence(
                generated_text=_text(request, r.end.generated_text),
                finish_reason=r.end.finish_reason,
                generated_tokens=r.end.generated_tokens,
                seed=r.end.seed,
                prefill=r.prefill,
                tokens=r.tokens,
            )
            for r in results[1:]
        ]
    details = Details(
        finish_reason=best.end.finish_reason,
        prompt_tokens=request.input_length,
        generated_tokens=best.end.generated_tokens,
        skipped_tokens=sum(token.skipped for token in best.tokens),
        seed=best.end.seed,
        prefill=best.prefill,
        tokens=best.tokens,
        best_of_sequences=best_of_sequences,
    )
    return GenerateResponse(generated_text=text, details=details)


def stream_token(token: Token) -> StreamResponse:
    return StreamResponse(token=token)


def stream_end(request: ValidRequest, end: EndEvent) -> StreamResponse:
    details = None
    if request.details:
        details = StreamDetails(
            finish_reason=end.finish_reason,
            prompt_tokens=request.input_length,
            generated_tokens=end.generated_tokens,
            seed=end.seed,
        )
    return StreamResponse(token=end.token, generated_text=_text(request, end.generated_text), details=details)


HEADER_SAFE = "".join(c for c in string.punctuation if c != "%") + " "


def header_value(value: str) -> str:
    """`value` safe for an HTTP header: user-given ids may hold non-ASCII or control characters (CR/LF), which
    are percent-encoded instead of failing the response or splitting the header."""
    return quote(value, safe=HEADER_SAFE)


def _adapter_headers(params: GenerateParameters, default_source: str) -> dict[str, str]:
    if params.merged_adapters is not None and params.merged_adapters.ids:
        ids = ",".join(params.merged_adapters.ids)
    elif params.adapter_id:
        ids = params.adapter_id
    else:
        return {}
    return {"x-adapter-id": header_value(ids), "x-adapter-source": header_value(params.adapter_source or default_source)}


def stream_headers(model_id: str, inputs: str, params: GenerateParameters, default_source: str) -> dict[str, str]:
    return {
        "x-compute-type": "gpu+optimized",
        "x-compute-characters": str(len(inputs)),
        "X-Accel-Buffering": "no",
        "x-model-id": header_value(model_id),
        **_adapter_headers(params, default_source),
    }


def generate_headers(
    model_id: str,
    params: GenerateParameters,
    default_source: str,
    request: ValidRequest,
    results: list[GenerationResult],
    started_at: float,
    validated_at: float,
) -> dict[str, str]:
    """Timing and token-count headers of the winning sequence; times in milliseconds."""
    best = results[0]
    now = time.monotonic()
    generated = best.end.generated_tokens
    inference_s = best.finished_at - best.batched_at

    def ms(seconds: float) -> str:
        return str(round(seconds * 1000))

    return {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": ms(now - started_at),
        "x-compute-characters": str(len(request.inputs)),
        "x-total-time": ms(now - started_at),
        "x-validation-time": ms(validated_at - started_at),
        "x-queue-time": ms(best.batched_at - best.queued_at),
        "x-inference-time": ms(inference_s),
        "x-time-per-token": ms(inference_s / max(generated, 1)),
        "x-time-to-first-token": ms(best.first_token_at - started_at),
        "x-time-per-output-token": ms((best.finished_at - best.first_token_at) / max(generated - 1, 1)),
        "x-prompt-tokens": str(request.input_length),
        "x-generated-tokens": str(generated),
        "x-skipped-tokens": str(sum(token.skipped for token in best.tokens)),
        "x-total-tokens": str(request.input_length + generated),
        "x-model-id": header_value(model_id),
        **_adapter_headers(params, default_source),
    }
