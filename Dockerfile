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

# The platform reads the manifest and the task templates from /img-man.
COPY img-man /img-man
COPY docker/start.sh /usr/bin/start.sh
RUN chmod 755 /usr/bin/start.sh && chmod -R a+rX /app /img-man

# The platform runs the image as a non-root user with /in read-only; everything is written to
# /out or a temp dir. No ENTRYPOINT: the platform's `docker run IMAGE cat /img-man/...` must work.
CMD ["bash", "/usr/bin/start.sh"]
