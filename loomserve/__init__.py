"""loomserve: an LLM inference server for open-weight models.

The one import name it installs. Its parts are subpackages: ``gateway`` (HTTP),
``scheduler`` (continuous batching, pure Python), ``worker`` (model and KV cache),
``kernels`` (Triton) and ``shared`` (the floor every process imports: wire format,
configuration, model files). The launcher sits here at the top: ``cli`` (the
``loomserve`` command), ``supervisor`` (``loomserve serve``'s processes) and
``local_engine`` (scheduler and worker in one process, for tests and benchmarks).
"""
