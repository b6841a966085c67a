"""Training data: Fashion-MNIST / folder / CSV sources through the serving recipe, augmentation, catalog-style
photo rendering and uploads through the preprocess service's code."""
