"""ImageNet colour statistics for pixels in [0, 1]: the defaults of PCA lighting and normalisation.

Eigenvalues/eigenvectors of the RGB covariance from fb.resnet.torch; mean/std as in torchvision.
Kept free of TensorFlow so configs and the GPU benchmark can import them.
"""

IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))  # rows R, G, B; columns are eigenvectors
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
