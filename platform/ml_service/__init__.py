"""ml_service: the Triton side of the platform (the seed's "ML Service").

``client``: the async gRPC client the ML worker uses (its retries: ``ml_worker.inference``, ``mlp.backoff``);
``launcher``: ``TritonProcess``, the local tritonserver from the nvidia-pytriton
wheel; ``bundle``: where that wheel keeps the server and its Python backend.
"""
