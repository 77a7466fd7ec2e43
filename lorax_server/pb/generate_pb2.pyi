from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS_TOKEN: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]

class AdapterSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HUB: _ClassVar[AdapterSource]
    S3: _ClassVar[AdapterSource]
    LOCAL: _ClassVar[AdapterSource]
    PBASE: _ClassVar[AdapterSource]

class MergeStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEAR: _ClassVar[MergeStrategy]
    TIES: _ClassVar[MergeStrategy]
    DARE_LINEAR: _ClassVar[MergeStrategy]
    DARE_TIES: _ClassVar[MergeStrategy]

class MajoritySignMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOTAL: _ClassVar[MajoritySignMethod]
    FREQUENCY: _ClassVar[MajoritySignMethod]
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS_TOKEN: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
HUB: AdapterSource
S3: AdapterSource
LOCAL: AdapterSource
PBASE: AdapterSource
LINEAR: MergeStrategy
TIES: MergeStrategy
DARE_LINEAR: MergeStrategy
DARE_TIES: MergeStrategy
TOTAL: MajoritySignMethod
FREQUENCY: MajoritySignMethod

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("requires_padding", "dtype", "device_type", "window_size", "block_size", "speculate", "preloaded_adapters", "supports_generation", "supports_embeddings", "supports_classification", "chunked_prefill", "requires_block_allocator", "model_implementation")
    REQUIRES_PADDING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    PRELOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_PREFILL_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_BLOCK_ALLOCATOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    requires_padding: bool
    dtype: str
    device_type: str
    window_size: int
    block_size: int
    speculate: int
    preloaded_adapters: _containers.RepeatedCompositeFieldContainer[PreloadedAdapter]
    supports_generation: bool
    supports_embeddings: bool
    supports_classification: bool
    chunked_prefill: bool
    requires_block_allocator: bool
    model_implementation: str
    def __init__(self, requires_padding: _Optional[bool] = ..., dtype: _Optional[str] = ..., device_type: _Optional[str] = ..., window_size: _Optional[int] = ..., block_size: _Optional[int] = ..., speculate: _Optional[int] = ..., preloaded_adapters: _Optional[_Iterable[_Union[PreloadedAdapter, _Mapping]]] = ..., supports_generation: _Optional[bool] = ..., supports_embeddings: _Optional[bool] = ..., supports_classification: _Optional[bool] = ..., chunked_prefill: _Optional[bool] = ..., requires_block_allocator: _Optional[bool] = ..., model_implementation: _Optional[str] = ...) -> None: ...

class PreloadedAdapter(_message.Message):
    __slots__ = ("adapter_parameters", "adapter_source", "adapter_index")
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    adapter_parameters: AdapterParameters
    adapter_source: AdapterSource
    adapter_index: int
    def __init__(self, adapter_parameters: _Optional[_Union[AdapterParameters, _Mapping]] = ..., adapter_source: _Optional[_Union[AdapterSource, str]] = ..., adapter_index: _Optional[int] = ...) -> None: ...

class ServiceDiscoveryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceDiscoveryResponse(_message.Message):
    __slots__ = ("urls",)
    URLS_FIELD_NUMBER: _ClassVar[int]
    urls: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, urls: _Optional[_Iterable[str]] = ...) -> None: ...

class ClearCacheRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ClearCacheResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NextTokenChooserParameters(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "typical_p", "do_sample", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "watermark", "adapter_id", "schema", "return_k_alternatives")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    RETURN_K_ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    do_sample: bool
    seed: int
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    watermark: bool
    adapter_id: str
    schema: str
    return_k_alternatives: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., typical_p: _Optional[float] = ..., do_sample: _Optional[bool] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., watermark: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., schema: _Optional[str] = ..., return_k_alternatives: _Optional[int] = ...) -> None: ...

class StoppingCriteriaParameters(_message.Message):
    __slots__ = ("max_new_tokens", "stop_sequences", "ignore_eos_token")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos_token: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., ignore_eos_token: _Optional[bool] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "mimetype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIMETYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mimetype: str
    def __init__(self, data: _Optional[bytes] = ..., mimetype: _Optional[str] = ...) -> None: ...

class InputChunk(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class TokenizedInputs(_message.Message):
    __slots__ = ("ids", "input_chunks")
    IDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    input_chunks: _containers.RepeatedCompositeFieldContainer[InputChunk]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., input_chunks: _Optional[_Iterable[_Union[InputChunk, _Mapping]]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("id", "inputs", "tokenized_inputs", "truncate", "parameters", "stopping_parameters", "prefill_logprobs", "adapter_index", "blocks", "slots", "cache_len", "chunk_len")
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STOPPING_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    inputs: str
    tokenized_inputs: TokenizedInputs
    truncate: int
    parameters: NextTokenChooserParameters
    stopping_parameters: StoppingCriteriaParameters
    prefill_logprobs: bool
    adapter_index: int
    blocks: _containers.RepeatedScalarFieldContainer[int]
    slots: _containers.RepeatedScalarFieldContainer[int]
    cache_len: int
    chunk_len: int
    def __init__(self, id: _Optional[int] = ..., inputs: _Optional[str] = ..., tokenized_inputs: _Optional[_Union[TokenizedInputs, _Mapping]] = ..., truncate: _Optional[int] = ..., parameters: _Optional[_Union[NextTokenChooserParameters, _Mapping]] = ..., stopping_parameters: _Optional[_Union[StoppingCriteriaParameters, _Mapping]] = ..., prefill_logprobs: _Optional[bool] = ..., adapter_index: _Optional[int] = ..., blocks: _Optional[_Iterable[int]] = ..., slots: _Optional[_Iterable[int]] = ..., cache_len: _Optional[int] = ..., chunk_len: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("id", "requests", "size", "max_tokens", "max_blocks")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    id: int
    requests: _containers.RepeatedCompositeFieldContainer[Request]
    size: int
    max_tokens: int
    max_blocks: int
    def __init__(self, id: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[Request, _Mapping]]] = ..., size: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_blocks: _Optional[int] = ...) -> None: ...

class CachedBatch(_message.Message):
    __slots__ = ("id", "request_ids", "size", "max_tokens", "current_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    request_ids: _containers.RepeatedScalarFieldContainer[int]
    size: int
    max_tokens: int
    current_tokens: int
    def __init__(self, id: _Optional[int] = ..., request_ids: _Optional[_Iterable[int]] = ..., size: _Optional[int] = ..., max_tokens: _Optional[int] = ..., current_tokens: _Optional[int] = ...) -> None: ...

class GeneratedText(_message.Message):
    __slots__ = ("text", "generated_tokens", "skipped_tokens", "finish_reason", "seed")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    text: str
    generated_tokens: int
    skipped_tokens: int
    finish_reason: FinishReason
    seed: int
    def __init__(self, text: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., skipped_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class AlternativeTokens(_message.Message):
    __slots__ = ("ids", "logprobs", "texts")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class NextTokens(_message.Message):
    __slots__ = ("ids", "logprobs", "texts", "is_special", "alternative_tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    IS_SPECIAL_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    texts: _containers.RepeatedScalarFieldContainer[str]
    is_special: _containers.RepeatedScalarFieldContainer[bool]
    alternative_tokens: _containers.RepeatedCompositeFieldContainer[AlternativeTokens]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., texts: _Optional[_Iterable[str]] = ..., is_special: _Optional[_Iterable[bool]] = ..., alternative_tokens: _Optional[_Iterable[_Union[AlternativeTokens, _Mapping]]] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("request_id", "prefill_tokens", "next_tokens", "generated_text", "prefill_tokens_length", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    prefill_tokens: NextTokens
    next_tokens: NextTokens
    generated_text: GeneratedText
    prefill_tokens_length: int
    error: str
    def __init__(self, request_id: _Optional[int] = ..., prefill_tokens: _Optional[_Union[NextTokens, _Mapping]] = ..., next_tokens: _Optional[_Union[NextTokens, _Mapping]] = ..., generated_text: _Optional[_Union[GeneratedText, _Mapping]] = ..., prefill_tokens_length: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class FilterBatchRequest(_message.Message):
    __slots__ = ("batch_id", "request_ids")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    request_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch_id: _Optional[int] = ..., request_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FilterBatchResponse(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: CachedBatch
    def __init__(self, batch: _Optional[_Union[CachedBatch, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("batch", "cached_batch")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CACHED_BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    cached_batch: CachedBatch
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., cached_batch: _Optional[_Union[CachedBatch, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("generations", "batch")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[Generation]
    batch: CachedBatch
    def __init__(self, generations: _Optional[_Iterable[_Union[Generation, _Mapping]]] = ..., batch: _Optional[_Union[CachedBatch, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[CachedBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[CachedBatch, _Mapping]]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("generations", "batch")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[Generation]
    batch: CachedBatch
    def __init__(self, generations: _Optional[_Iterable[_Union[Generation, _Mapping]]] = ..., batch: _Optional[_Union[CachedBatch, _Mapping]] = ...) -> None: ...

class WarmupRequest(_message.Message):
    __slots__ = ("batch", "max_input_length", "max_prefill_tokens", "max_new_tokens")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    batch: Batch
    max_input_length: int
    max_prefill_tokens: int
    max_new_tokens: int
    def __init__(self, batch: _Optional[_Union[Batch, _Mapping]] = ..., max_input_length: _Optional[int] = ..., max_prefill_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class WarmupResponse(_message.Message):
    __slots__ = ("max_supported_total_tokens",)
    MAX_SUPPORTED_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_supported_total_tokens: int
    def __init__(self, max_supported_total_tokens: _Optional[int] = ...) -> None: ...

class AdapterParameters(_message.Message):
    __slots__ = ("adapter_ids", "weights", "merge_strategy", "density", "majority_sign_method")
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    merge_strategy: MergeStrategy
    density: float
    majority_sign_method: MajoritySignMethod
    def __init__(self, adapter_ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., merge_strategy: _Optional[_Union[MergeStrategy, str]] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[_Union[MajoritySignMethod, str]] = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_parameters", "adapter_source", "api_token")
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapter_parameters: AdapterParameters
    adapter_source: AdapterSource
    api_token: str
    def __init__(self, adapter_parameters: _Optional[_Union[AdapterParameters, _Mapping]] = ..., adapter_source: _Optional[_Union[AdapterSource, str]] = ..., api_token: _Optional[str] = ...) -> None: ...

class AdapterMemory(_message.Message):
    __slots__ = ("device_bytes", "device_adapters", "host_bytes", "host_adapters", "disk_bytes", "disk_adapters", "device_pool_bytes")
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    device_bytes: int
    device_adapters: int
    host_bytes: int
    host_adapters: int
    disk_bytes: int
    disk_adapters: int
    device_pool_bytes: int
    def __init__(self, device_bytes: _Optional[int] = ..., device_adapters: _Optional[int] = ..., host_bytes: _Optional[int] = ..., host_adapters: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., disk_adapters: _Optional[int] = ..., device_pool_bytes: _Optional[int] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("downloaded", "memory_fraction", "memory")
    DOWNLOADED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    downloaded: bool
    memory_fraction: float
    memory: AdapterMemory
    def __init__(self, downloaded: _Optional[bool] = ..., memory_fraction: _Optional[float] = ..., memory: _Optional[_Union[AdapterMemory, _Mapping]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_parameters", "adapter_source", "adapter_index", "api_token")
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapter_parameters: AdapterParameters
    adapter_source: AdapterSource
    adapter_index: int
    api_token: str
    def __init__(self, adapter_parameters: _Optional[_Union[AdapterParameters, _Mapping]] = ..., adapter_source: _Optional[_Union[AdapterSource, str]] = ..., adapter_index: _Optional[int] = ..., api_token: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("loaded", "memory")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    memory: AdapterMemory
    def __init__(self, loaded: _Optional[bool] = ..., memory: _Optional[_Union[AdapterMemory, _Mapping]] = ...) -> None: ...

class OffloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_parameters", "adapter_source", "adapter_index")
    ADAPTER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    adapter_parameters: AdapterParameters
    adapter_source: AdapterSource
    adapter_index: int
    def __init__(self, adapter_parameters: _Optional[_Union[AdapterParameters, _Mapping]] = ..., adapter_source: _Optional[_Union[AdapterSource, str]] = ..., adapter_index: _Optional[int] = ...) -> None: ...

class OffloadAdapterResponse(_message.Message):
    __slots__ = ("offloaded", "memory")
    OFFLOADED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    offloaded: bool
    memory: AdapterMemory
    def __init__(self, offloaded: _Optional[bool] = ..., memory: _Optional[_Union[AdapterMemory, _Mapping]] = ...) -> None: ...
