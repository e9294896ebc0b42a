# One image for all four Cake services: `docker run cake serve gateway|merger|compute|loader`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first (its own layer, cached across code changes); pyproject admits it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY services/ services/
RUN pip install . && rm -rf /src

# Non-root; /staging is the node-local staging area shared by loader and compute, /kv-cache
# the loader's near tier in front of S3 (volumes; a new named volume takes this ownership).
RUN useradd --create-home --uid 10001 --user-group cake \
    && mkdir -p /staging /kv-cache \
    && chown cake:cake /staging /kv-cache
USER cake
WORKDIR /home/cake

ENTRYPOINT ["cake"]
CMD ["--help"]
