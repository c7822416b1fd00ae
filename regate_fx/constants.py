"""Constants both halves use (the graph side and the runtime); this module imports nothing."""

IGNORE_INDEX = -100  # the label of a token no loss counts (Hugging Face's and torch.nn.CrossEntropyLoss's)
