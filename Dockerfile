# syntax=docker/dockerfile:1
# mirseg YMIR executor image: docker build -t mirseg-ymir:0.1 .
# CUDA runtime base; PyTorch brings its own CUDA libraries, the base provides the driver glue.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/tmp/mirseg-cache/torch \
    XDG_CACHE_HOME=/tmp/mirseg-cache \
    MPLCONFIGDIR=/tmp/mirseg-cache/matplotlib

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md constraints.txt /app/
COPY mirseg /app/mirseg
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
    && pip install -c /app/constraints.txt "/app[export]"

# Pretrained starts for training tasks without a pretrained model: pretrained=auto reads /weights (the
# original image's place). WEIGHTS: zoo (default: the model-zoo checkpoint of every mmseg config, about
# 0.95 GB), all (plus the ImageNet backbones, about 1.3 GB), none (a slim image; training starts from random
# weights, warned), or file and preset names. WEIGHTS_URL_BASE: a mirror serving <URL>/<file name>.
ARG WEIGHTS=zoo
ARG WEIGHTS_URL_BASE=
ENV MIRSEG_WEIGHTS=/weights
# Downloads are kept in a BuildKit cache between builds (a code change does not fetch them again); /weights
# gets the chosen files from there, each verified against the sha256 in its name.
RUN --mount=type=cache,target=/var/cache/mirseg-weights \
    mkdir -p /weights \
    && if [ "$WEIGHTS" != none ]; then \
         mirseg weights download --dir /var/cache/mirseg-weights ${WEIGHTS_URL_BASE:+--url-base "$WEIGHTS_URL_BASE"} \
             $WEIGHTS \
         && mirseg weights download --dir /weights --url-base file:///var/cache/mirseg-weights $WEIGHTS; \
       fi \
    && chmod -R a+rX /weights

# The platform reads the manifest and the task templates from /img-man.
COPY img-man /img-man
COPY docker/start.sh /usr/bin/start.sh
RUN chmod 755 /usr/bin/start.sh && chmod -R a+rX /app /img-man

# The platform runs the image as a non-root user with /in read-only; everything is written to
# /out or a temp dir. No ENTRYPOINT: the platform's `docker run IMAGE cat /img-man/...` must work.
CMD ["bash", "/usr/bin/start.sh"]
