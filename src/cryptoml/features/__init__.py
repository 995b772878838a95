"""What the model sees: the 12 features, defined once (kernels), computed by the same code for training and live use."""
