"""The runtime: policies, detector packs, the steering engine, ``SteeredLLM`` and its reports."""
