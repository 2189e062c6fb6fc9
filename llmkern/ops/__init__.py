"""torch.library ops (``llmkern::*``), their autograd, and the backend choice per call."""
