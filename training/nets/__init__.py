"""The networks: seed CNN, small ResNet, EfficientNet-Lite0 (ImageNet weights), and the uint8-NHWC wrapper that
gives each the served input contract."""
