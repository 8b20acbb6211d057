"""Hard negatives mined with a model: a pool encoded, every training query ranked, false negatives filtered."""
