"""Training-time domain adaptation: gradient reversal (DANN), CORAL, MMD and pseudo-labelling building blocks."""
