"""Engine integrations. Each submodule imports its engine lazily and is never imported by the core
package, so decodekit works without any engine installed.

- ``decodekit.integrations.vllm``: a ``vllm.general_plugins`` entry point (opt-in) that routes vLLM
  V1's sampling and speculative-decoding verification to decodekit.
"""
