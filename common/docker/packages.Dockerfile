# The third-party packages of an image, in /opt/venv: every wheel of one wheelhouse set (pinned and
# listed in common/requirements, made by `make wheelhouse`), installed without a network. Built
# once per set as flarebox-packages:<set> (`make packages`) with the wheelhouse folder as its
# context; the task images copy its venv and add the flarebox wheel.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
COPY . /wheels
# bytecode compiled at build time; compileall skips torch's test files written in Python 3.12 syntax
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
 && rm -rf /opt/venv/lib/python3*/site-packages/setuptools \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312|triton/' /opt/venv/lib

FROM ${BASE_IMAGE}
COPY --from=install /opt/venv /opt/venv
