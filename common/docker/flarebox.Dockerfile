# The flarebox wheel installed as a site-packages folder, /site: the one part of an image that
# changes with flarebox's code. Built by `make build` as flarebox-site:latest with the folder
# .wheelhouse/flarebox as its context; every task image copies /site into its venv.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
COPY . /wheel
RUN python3 -m venv /tmp/pip \
 && /tmp/pip/bin/pip install --no-cache-dir --no-index --no-deps --target /site /wheel/flarebox-*.whl \
 && rm -rf /site/bin /tmp/pip && python3 -m compileall -q /site/flarebox
