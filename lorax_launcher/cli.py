"""`lorax-launcher`: the one place where every launcher flag is defined (name, env var, default, help).

The flags, their env vars, defaults and order follow the published help of the reference launcher, so existing
deployments (Docker `-e MODEL_ID=...`, Kubernetes env, scripts) work unchanged.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import click
from click.core import ParameterSource

from lorax_launcher.config import ConfigError, build_config
from lorax_launcher.logs import log, setup_logging
from lorax_launcher.processes import launch
from lorax_launcher.runtime_env import runtime_report

QUANTIZE_CHOICES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq")
DTYPE_CHOICES = ("float16", "bfloat16")
# Shown with their documented default in --help, but derived from the model when not given (see config.py).
DERIVED_WHEN_DEFAULT = ("max_input_length", "max_total_tokens", "max_batch_prefill_tokens")
SECRET_OPTIONS = ("ngrok_authtoken",)



class _Unsigned(click.types.IntParamType):
    """A non-negative integer (Rust's usize/u16 in the reference), without click's range note in --help."""

    def __init__(self, maximum: int | None = None) -> None:
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = super().convert(value, param, ctx)
        if number < 0 or (self.maximum is not None and number > self.maximum):
            upper = f" and <= {self.maximum}" if self.maximum is not None else ""
            self.fail(f"{number} is not >= 0{upper}", param, ctx)
        return number


USIZE = _Unsigned()
U16 = _Unsigned(65535)


def _opt(*decls: str, envvar: str | None, help: str, **kwargs: Any) -> Callable:
    """A documented launcher option: env var shown in --help, default shown when there is one."""
    metavar = kwargs.pop("metavar", None)
    if metavar is None and not kwargs.get("is_flag"):
        metavar = "<" + decls[-1].lstrip("-").replace("-", "_").upper() + ">"
    return click.option(*decls, envvar=envvar, show_envvar=envvar is not None, show_default=True,
                        metavar=metavar, help=help, **kwargs)


def _choice(values: tuple[str, ...], help: str) -> dict[str, Any]:
    """Keyword arguments for an option restricted to `values`, listing them in its help."""
    return {"type": click.Choice(values, case_sensitive=False),
            "help": f"{help}  [possible values: {', '.join(values)}]"}


def _to_bool(_ctx: click.Context, _param: click.Parameter, value: str | None) -> bool | None:
    """`--sharded true|false` (an optional bool, not a presence flag)."""
    return None if value is None else value.lower() == "true"


@click.command(name="lorax-launcher", help="LoRAX Launcher",
               context_settings={"max_content_width": 120})
@_opt("--model-id", envvar="MODEL_ID", default="mistralai/Mistral-7B-Instruct-v0.1",
      help="The name of the model to load. Can be a MODEL_ID as listed on <https://hf.co/models> like `gpt2` or "
           "`mistralai/Mistral-7B-Instruct-v0.1`. Or it can be a local directory containing the necessary files as "
           "saved by `save_pretrained(...)` methods of transformers")
@_opt("--adapter-id", envvar="ADAPTER_ID", default="",
      help="The name of the adapter to load. Can be a MODEL_ID as listed on <https://hf.co/models> or it can be a "
           "local directory containing the necessary files as saved by `save_pretrained(...)` methods of "
           "transformers. Should be compatible with the model specified in `model_id`")
@_opt("--source", envvar="SOURCE", default="hub",
      help="The source of the model to load. Can be `hub` or `s3`. `hub` will load the model from the huggingface "
           "hub. `s3` will load the model from the predibase S3 bucket")
@_opt("--adapter-source", envvar="ADAPTER_SOURCE", default="hub",
      help="The source of the model to load. Can be `hub` or `s3` or `pbase` `hub` will load the model from the "
           "huggingface hub. `s3` will load the model from the predibase S3 bucket. `pbase` will load an s3 model "
           "but resolve the metadata from a predibase server")
@_opt("--revision", envvar="REVISION",
      help="The actual revision of the model if you're referring to a model on the hub. You can use a specific "
           "commit id or a branch like `refs/pr/2`")
@_opt("--validation-workers", envvar="VALIDATION_WORKERS", type=USIZE, default=2,
      help="The number of tokenizer workers used for payload validation and truncation inside the router")
@_opt("--sharded", envvar="SHARDED", callback=_to_bool,
      **_choice(("true", "false"),
                "Whether to shard the model across multiple GPUs By default LoRAX will use all available GPUs to run "
                "the model. Setting it to `false` deactivates `num_shard`"))
@_opt("--num-shard", envvar="NUM_SHARD", type=USIZE,
      help="The number of shards to use if you don't want to use all GPUs on a given machine. You can use "
           "`CUDA_VISIBLE_DEVICES=0,1 lorax-launcher... --num_shard 2` and `CUDA_VISIBLE_DEVICES=2,3 "
           "lorax-launcher... --num_shard 2` to launch 2 copies with 2 shard each on a given machine with 4 GPUs "
           "for instance")
@_opt("--quantize", envvar="QUANTIZE",
      **_choice(QUANTIZE_CHOICES,
                "Whether you want the model to be quantized. This will use `bitsandbytes` for quantization on the "
                "fly, or `gptq`"))
@_opt("--compile", envvar="COMPILE", is_flag=True,
      help="Whether you want to compile the model into a CUDA graph. This will speed up decoding but increase GPU "
           "memory usage")
@_opt("--dtype", envvar="DTYPE",
      **_choice(DTYPE_CHOICES, "The dtype to be forced upon the model. This option cannot be used with `--quantize`"))
@_opt("--trust-remote-code", envvar="TRUST_REMOTE_CODE", is_flag=True,
      help="Whether you want to execute hub modelling code. Explicitly passing a `revision` is encouraged when "
           "loading a model with custom code to ensure no malicious code has been contributed in a newer revision")
@_opt("--max-concurrent-requests", envvar="MAX_CONCURRENT_REQUESTS", type=USIZE, default=128,
      help="The maximum amount of concurrent requests for this particular deployment. Having a low limit will "
           "refuse clients requests instead of having them wait for too long and is usually good to handle "
           "backpressure correctly")
@_opt("--max-best-of", envvar="MAX_BEST_OF", type=USIZE, default=2,
      help="This is the maximum allowed value for clients to set `best_of`. Best of makes `n` generations at the "
           "same time, and return the best in terms of overall log probability over the entire generated sequence")
@_opt("--max-stop-sequences", envvar="MAX_STOP_SEQUENCES", type=USIZE, default=4,
      help="This is the maximum allowed value for clients to set `stop_sequences`. Stop sequences are used to allow "
           "the model to stop on more than just the EOS token, and enable more complex \"prompting\" where users "
           "can preprompt the model in a specific way and define their \"own\" stop token aligned with their prompt")
@_opt("--max-input-length", envvar="MAX_INPUT_LENGTH", type=USIZE, default=1792,
      help="This is the maximum allowed input length (expressed in number of tokens) for users. The larger this "
           "value, the longer prompt users can send which can impact the overall memory required to handle the "
           "load. Please note that some models have a finite range of sequence they can handle")
@_opt("--max-total-tokens", envvar="MAX_TOTAL_TOKENS", type=USIZE, default=2048,
      help="This is the most important value to set as it defines the \"memory budget\" of running clients "
           "requests. Clients will send input sequences and ask to generate `max_new_tokens` on top. with a value "
           "of `1512` users can send either a prompt of `1000` and ask for `512` new tokens, or send a prompt of `1` "
           "and ask for `1511` max_new_tokens. The larger this value, the larger amount each request will be in "
           "your RAM and the less effective batching can be")
@_opt("--waiting-served-ratio", envvar="WAITING_SERVED_RATIO", type=float, default=1.2,
      help="This represents the ratio of waiting queries vs running queries where you want to start considering "
           "pausing the running queries to include the waiting ones into the same batch. "
           "`waiting_served_ratio=1.2` Means when 12 queries are waiting and there's only 10 queries left in the "
           "current batch we check if we can fit those 12 waiting queries into the batching strategy, and if yes, "
           "then batching happens delaying the 10 running queries by a `prefill` run.\n\n"
           "This setting is only applied if there is room in the batch as defined by `max_batch_total_tokens`.")
@_opt("--max-batch-prefill-tokens", envvar="MAX_BATCH_PREFILL_TOKENS", type=USIZE, default=4096,
      help="Limits the number of tokens for the prefill operation. Since this operation take the most memory and "
           "is compute bound, it is interesting to limit the number of requests that can be sent")
@_opt("--max-batch-total-tokens", envvar="MAX_BATCH_TOTAL_TOKENS", type=USIZE,
      help="**IMPORTANT** This is one critical control to allow maximum usage of the available hardware.\n\n"
           "This represents the total amount of potential tokens within a batch. When using padding (not "
           "recommended) this would be equivalent of `batch_size` * `max_total_tokens`.\n\n"
           "However in the non-padded (flash attention) version this can be much finer.\n\n"
           "For `max_batch_total_tokens=1000`, you could fit `10` queries of `total_tokens=100` or a single query "
           "of `1000` tokens.\n\n"
           "Overall this number should be the largest possible amount that fits the remaining memory (after the "
           "model is loaded). Since the actual memory overhead depends on other parameters like if you're using "
           "quantization, flash attention or the model implementation, LoRAX cannot infer this number "
           "automatically.")
@_opt("--max-waiting-tokens", envvar="MAX_WAITING_TOKENS", type=USIZE, default=20,
      help="This setting defines how many tokens can be passed before forcing the waiting queries to be put on the "
           "batch (if the size of the batch allows for it). New queries require 1 `prefill` forward, which is "
           "different from `decode` and therefore you need to pause the running batch in order to run `prefill` to "
           "create the correct values for the waiting queries to be able to join the batch.\n\n"
           "With a value too small, queries will always \"steal\" the compute to run `prefill` and running queries "
           "will be delayed by a lot.\n\n"
           "With a value too big, waiting queries could wait for a very long time before being allowed a slot in "
           "the running batch. If your server is busy that means that requests that could run in ~2s on an empty "
           "server could end up running in ~20s because the query had to wait for 18s.\n\n"
           "This number is expressed in number of tokens to make it a bit more \"model\" agnostic, but what should "
           "really matter is the overall latency for end users.")
@_opt("--max-active-adapters", envvar="MAX_ACTIVE_ADAPTERS", type=USIZE, default=1024,
      help="Maximum number of adapters that can be placed on the GPU and accept requests at a time")
@_opt("--adapter-cycle-time-s", envvar="ADAPTER_CYCLE_TIME_S", type=USIZE, default=2,
      help="The time in seconds between adapter exchanges")
@_opt("--hostname", envvar="HOSTNAME", default="0.0.0.0",
      help="The IP address to listen on")
@_opt("-p", "--port", envvar="PORT", type=U16, default=3000,
      help="The port to listen on")
@_opt("--shard-uds-path", envvar="SHARD_UDS_PATH", default="/tmp/lorax-server",
      help="The name of the socket for gRPC communication between the webserver and the shards")
@_opt("--master-addr", envvar="MASTER_ADDR", default="localhost",
      help="The address the master shard will listen on. (setting used by torch distributed)")
@_opt("--master-port", envvar="MASTER_PORT", type=U16, default=29500,
      help="The address the master port will listen on. (setting used by torch distributed)")
@_opt("--huggingface-hub-cache", envvar="HUGGINGFACE_HUB_CACHE",
      help="The location of the huggingface hub cache. Used to override the location if you want to provide a "
           "mounted disk for instance")
@_opt("--weights-cache-override", envvar="WEIGHTS_CACHE_OVERRIDE",
      help="The location of the huggingface hub cache. Used to override the location if you want to provide a "
           "mounted disk for instance")
@_opt("--disable-custom-kernels", envvar="DISABLE_CUSTOM_KERNELS", is_flag=True,
      help="For some models (like llama), LoRAX implemented custom cuda kernels to speed up inference. Those "
           "kernels were only tested on A100. Use this flag to disable them if you're running on different hardware "
           "and encounter issues")
@_opt("--cuda-memory-fraction", envvar="CUDA_MEMORY_FRACTION", type=float, default=1.0,
      help="Limit the CUDA available memory. The allowed value equals the total visible memory multiplied by "
           "cuda-memory-fraction")
@_opt("--json-output", envvar="JSON_OUTPUT", is_flag=True,
      help="Outputs the logs in JSON format (useful for telemetry)")
@_opt("--otlp-endpoint", envvar="OTLP_ENDPOINT",
      help="OpenTelemetry collector endpoint the shards and the router export traces to")
@_opt("--cors-allow-origin", envvar="CORS_ALLOW_ORIGIN",
      help="Origin allowed to call the router from a browser (CORS)")
@_opt("--watermark-gamma", envvar="WATERMARK_GAMMA", type=float,
      help="Watermarking: fraction of the vocabulary in the green list")
@_opt("--watermark-delta", envvar="WATERMARK_DELTA", type=float,
      help="Watermarking: bias added to green-list logits")
@_opt("--ngrok", envvar="NGROK", is_flag=True, help="Enable ngrok tunneling")
@_opt("--ngrok-authtoken", envvar="NGROK_AUTHTOKEN", help="ngrok authentication token")
@_opt("--ngrok-edge", envvar="NGROK_EDGE", help="ngrok edge")
@_opt("-e", "--env", envvar=None, is_flag=True,
      help="Display a lot of information about your runtime environment")
@_opt("--download-only", envvar="DOWNLOAD_ONLY", is_flag=True, help="Download model weights only")
@click.help_option("-h", "--help", help="Print help")
@click.version_option(None, "-V", "--version", package_name="lorax-py", prog_name="lorax-launcher",
                      help="Print version")
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """Validate every flag up front, then supervise the download, the shards and the router."""
    setup_logging(options["json_output"])
    options = {p.name: options[p.name] for p in ctx.command.params if p.name in options}  # --help order
    if options.pop("env"):
        log.info("Runtime environment:\n%s", runtime_report(redacted(options)))
    for name in DERIVED_WHEN_DEFAULT:
        if ctx.get_parameter_source(name) is ParameterSource.DEFAULT:
            options[name] = None
    try:
        config = build_config(options, os.environ)
    except ConfigError as err:
        click.echo(f"Error: {err.variant}: {err}", err=True)
        ctx.exit(1)
    log.info("Args %s", redacted(options))
    ctx.exit(launch(config))


def redacted(options: dict[str, Any]) -> dict[str, Any]:
    """The parsed options with secrets replaced, safe to log."""
    return {k: ("<redacted>" if k in SECRET_OPTIONS and v else v) for k, v in options.items()}
