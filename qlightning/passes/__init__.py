"""Graph passes that make a QAT model deployable."""
