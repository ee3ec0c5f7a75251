# The image of the `cpu` and `gpu` workers (docker-compose.yml): the project installed in /app, where
# prefect.yaml's pull step puts flow runs. TORCH_INDEX_URL picks the torch build: CPU by default, a CUDA
# index for the gpu worker.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# A C compiler for torch.compile (finetune.compile) and numba's cache; nothing else from Debian.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install torch --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY tasks ./tasks
RUN pip install -e '.[lora,ray]'
COPY prefect.yaml Makefile ./
COPY configs ./configs
COPY data/seed_tasks.jsonl ./data/seed_tasks.jsonl

# Convert the bundled Gemma GGUF once, at build time, into the image's cache (about a minute).
RUN python -c "from tasks.llm.models import bundled_model_dir; print(bundled_model_dir())"

CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
