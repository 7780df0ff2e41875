"""resmom: momentum self-supervised learning with residual momentum, on Ray, FFCV and MLflow."""

__version__ = "0.1.0"
