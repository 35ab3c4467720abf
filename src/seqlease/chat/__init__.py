"""Chat on a leased sequence: the model's chat template and the ephemeral ChatSession."""
