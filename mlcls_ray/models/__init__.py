"""Models: the ML-Decoder head, the backbone zoo and the loss."""
