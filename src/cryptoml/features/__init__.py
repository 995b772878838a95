"""What the model sees: the 12 features, built by the same FeatureManager for training and live use."""
