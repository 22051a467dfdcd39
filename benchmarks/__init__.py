"""Benchmarks of mergekit-ace: quality on real experts, speed and memory. Every entry point
runs as a module from the repository root (``python -m benchmarks.demo``,
``python -m benchmarks.real_llama.run``, ``python -m benchmarks.perf_kernel``, ...), with the
package installed (``pip install -e .``).

Shared library: :mod:`benchmarks.real_llama` (the base model and tokenizer, the data sets,
fine-tuning and scoring, the expert sets and their cache, and the ``mergekit-yaml`` pipeline).
The generative benchmark and the demo build on it; the ``perf_*`` modules measure the kernel
and ``mergekit-yaml`` and share :mod:`benchmarks.perf_kernel`'s synthetic Llama-3-8B shapes.
Nothing here imports the test suite.
"""
