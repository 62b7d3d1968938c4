"""Network architectures: the ADM UNet prior and the ResNet encoder of the variational estimator."""
