"""The Equinox network: config, attention, decoder layer, the scanned layer stack with
its `inject` argument, the model, the frozen teacher wrapper, heterogeneous layers and
per-layer costs."""
