"""training.adaptation."""
