# lorax-py: configure with env vars (MODEL_ID, PORT, MAX_TOTAL_TOKENS, ...), as in the README.
FROM python:3.11-slim
WORKDIR /app
# g++ builds the CPU multi-LoRA kernel where the container runs (cached under /data across restarts)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 HUGGINGFACE_HUB_CACHE=/data PORT=80 TORCH_EXTENSIONS_DIR=/data/torch_extensions
COPY pyproject.toml README.md ./
COPY proto proto
COPY lorax_launcher lorax_launcher
COPY lorax_server lorax_server
COPY router router
# TORCH_SPEC picks the build: the default range takes PyPI's CUDA wheels; use torch==2.13.0 for a CPU image.
ARG TORCH_SPEC="torch>=2.5,<3"
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir .
EXPOSE 80
ENTRYPOINT ["lorax-launcher"]
